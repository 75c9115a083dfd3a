"""DeepSeek-V3 for causal language modelling: embedding -> blocks -> norm -> head (+ MTP modules).

Module names mirror Hugging Face's `DeepseekV3ForCausalLM` (model.embed_tokens, model.layers.N.self_attn.*,
model.norm, lm_head) so state dicts map one to one; only routed experts (fused here, per expert in
checkpoints) and MTP modules (`mtp.k` here, `model.layers.{L+k}` in checkpoints) are renamed on I/O
(nanoseek.model.state_dict_adapter).

One forward pass serves training, scoring and generation: with a `LatentKVCache` the same modules take
the absorbed attention path over the cache (see nanoseek.model.mla). This module is pure: generation
(nanoseek.inference) and file I/O (nanoseek.hf) are built on top of it, and `nanoseek.DeepseekV3ForCausalLM`
adds `generate` / `save_pretrained` / `from_pretrained` for users.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
from nanoseek.model.cache import LatentKVCache
from nanoseek.model.moe import MoE, GroupedExperts
from nanoseek.model.mtp import MTPModule
from nanoseek.model.norm import RMSNorm
from nanoseek.model.router import Router
from nanoseek.model.rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm + mtp + balance: what training minimises
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean CE over MTP depths (before lambda)
    balance_loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # final normed hidden state [B, T, D] (return_hidden=True)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 1 = token, 0 = padding -> bool [B, 1, T, T] causal mask that ignores padded keys.
    Every query keeps itself, so padded rows stay finite (their outputs are never used)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return causal & (keys | eye)


def attention_bias_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The forward's `attention_mask` as what attention takes: None (plain causal) or bool [B, 1, T, T].
    Accepts a [B, T] 1/0 padding mask or a bool [B, 1, T, T] mask (True = attend), e.g. block-diagonal
    for packed sequences."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        return None if attention_mask.all() else padding_mask(attention_mask)
    if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        return attention_mask
    raise ValueError(f"attention_mask must be [B, T] (1 = token, 0 = padding) or bool [B, 1, T, T], "
                     f"got {attention_mask.dtype} of shape {tuple(attention_mask.shape)}")


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits at position i against labels at i + 1 (-100 is ignored).
    logits [B, T, V] and labels [B, T] are aligned by position. The targets are shifted, not the logits:
    the last position gets -100, so the logits are never sliced into a copy (forward) nor scattered back into
    zeros (backward); on CPU at the bench shapes that is 25 -> 18 ms per step in float32 (docs/performance.md)."""
    target = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, cache: LatentKVCache | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, D]. Without a cache: `position_ids` [B or 1, T] and an optional
        bool attn_mask [B, 1, T, T]. With one: positions and mask are those of `cache.step`, which the
        caller reserved for these tokens (`cache.begin_step`)."""
        cos, sin = self.rotary_emb(position_ids) if cache is None else cache.step.rope_tables(self.rotary_emb)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache)
        return self.norm(h)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.num_nextn_predict_layers + 1))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, GroupedExperts):
                nn.init.normal_(m.gate_up_proj, std=std)
                nn.init.normal_(m.down_proj, std=std)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, std=std)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                mtp_weight: float | None = None, return_hidden: bool = False,
                cache: LatentKVCache | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """Logits, and with `labels` the training loss.

        labels [B, T]: aligned with input_ids (the loss shifts them); -100 is ignored.
        attention_mask: [B, T] 1 = token / 0 = padding, or bool [B, 1, T, T] (True = attend), e.g.
          block-diagonal for packed sequences. It applies to the trunk and to the MTP modules.
        position_ids: [B or 1, T]; default 0..T-1 (packed sequences restart them per segment).
        mtp_weight: lambda for the MTP loss (None = the config's; 0 skips the MTP modules entirely,
          e.g. for validation loss).
        cache: generate over a `LatentKVCache`: the tokens are appended to it and attend to everything
          it holds. attention_mask is then [B, T] marking real tokens among the new ones (left padding);
          positions come from the cache; labels are not accepted.
        logits_to_keep: compute logits for the last n positions only (0 = all), as generation needs.
        """
        if labels is not None and logits_to_keep:
            raise ValueError("the loss needs the logits of every position: logits_to_keep must be 0 with labels")
        if cache is not None:
            if labels is not None or position_ids is not None:
                raise ValueError("with a cache, positions come from the cache and no loss is computed")
            cache.begin_step(input_ids.shape[1], None if attention_mask is None else attention_mask.bool())
            attn_mask = None
        else:
            for moe in self.moe_layers():  # a layer that does not run in this call must not report a loss
                moe.balance_loss = None  # (nor keep its old graph alive)
            T = input_ids.shape[1]
            if T > self.config.max_position_embeddings:
                raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            if position_ids is None:
                position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
            attn_mask = attention_bias_mask(attention_mask)
        hidden = self.model(input_ids, position_ids, attn_mask, cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        out = CausalLMOutput(logits=logits, hidden_states=hidden if return_hidden else None)
        if labels is None:
            return out
        out.lm_loss = next_token_ce(logits, labels)
        out.loss = out.lm_loss
        if len(self.mtp) and input_ids.shape[1] > len(self.mtp) + 1 and mtp_weight != 0:
            out.mtp_loss = self._mtp_loss(hidden, input_ids, labels, position_ids, attn_mask)
            weight = self.config.mtp_loss_weight if mtp_weight is None else mtp_weight
            out.loss = out.loss + weight * out.mtp_loss
        balance = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        if balance:
            out.balance_loss = torch.stack(balance).sum()
            out.loss = out.loss + out.balance_loss
        return out

    def _mtp_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                  position_ids: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over depths k of CE(predict token i+k+1 at position i) (DeepSeek-V3 technical report, §2.2)."""
        T = input_ids.shape[1]
        losses, h = [], hidden
        for k in range(1, len(self.mtp) + 1):
            n = T - k  # positions that have a token k ahead
            mask = attn_mask[..., :n, :n] if attn_mask is not None else None
            h = self.mtp_hidden(k, h[:, :n], input_ids[:, k:], position_ids[:, :n], mask)
            losses.append(next_token_ce(self.mtp_logits(k, h), labels[:, k:]))
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------ multi-token prediction
    def mtp_hidden(self, depth: int, prev_hidden: torch.Tensor, next_ids: torch.Tensor,
                   position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                   cache: LatentKVCache | None = None) -> torch.Tensor:
        """MTP module `depth` (1-based): the previous depth's hidden states [B, n, D] (the trunk's normed
        output for depth 1) and the tokens one step ahead of them [B, n] -> this depth's hidden [B, n, D].
        With a cache, positions and mask are those of `cache.step`: the trunk pass over the same tokens
        (speculative decoding drafts this way; the module's block writes its own cache layer)."""
        cos, sin = self.model.rotary_emb(position_ids) if cache is None else cache.step.rope_tables(
            self.model.rotary_emb)
        return self.mtp[depth - 1](prev_hidden, self.model.embed_tokens(next_ids), cos, sin, attn_mask, cache)

    def mtp_logits(self, depth: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of MTP depth `depth` from its hidden states (its own norm, the shared output head)."""
        return self.lm_head(self.mtp[depth - 1].shared_head.norm(hidden))
