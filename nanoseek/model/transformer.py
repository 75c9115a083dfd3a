"""DeepSeek-V3 for causal language modelling: embedding -> blocks -> norm -> head (+ MTP modules).

Module names mirror Hugging Face's `DeepseekV3ForCausalLM` (model.embed_tokens, model.layers.N.self_attn.*,
model.norm, lm_head) so state dicts map one to one; only routed experts (fused here, per expert in
checkpoints) and MTP modules (`mtp.k` here, `model.layers.{L+k}` in checkpoints) are renamed on I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.block import Block
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
    hidden_states: torch.Tensor | None = None  # final normed hidden state [B, T, D]


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 1 = token, 0 = padding -> bool [B, 1, T, T] causal mask that ignores padded keys.
    Every query keeps itself, so padded rows stay finite (their outputs are never used)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    keys = attention_mask.bool()[:, None, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return causal & (keys | eye)


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits at position i against labels at i + 1 (-100 is ignored).
    logits [B, T, V] and labels [B, T] are aligned by position."""
    logits, target = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = self.rotary_emb(position_ids)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask)
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
                mtp_weight: float | None = None, return_hidden: bool = False) -> CausalLMOutput:
        """Logits, and with `labels` the training loss. mtp_weight: lambda for the MTP loss (None = the
        config's; 0 skips the MTP modules entirely, e.g. for validation loss)."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
        attn_mask = padding_mask(attention_mask) if attention_mask is not None and not attention_mask.all() else None
        hidden = self.model(input_ids, position_ids, attn_mask)
        logits = self.lm_head(hidden)
        out = CausalLMOutput(logits=logits, hidden_states=hidden if return_hidden else None)
        if labels is None:
            return out
        out.lm_loss = next_token_ce(logits, labels)
        out.loss = out.lm_loss
        if len(self.mtp) and T > len(self.mtp) + 1 and mtp_weight != 0:
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
        """Mean over depths k of CE(predict token i+k+1 at position i) (REFERENCE §4)."""
        T = input_ids.shape[1]
        losses, h = [], hidden
        for k, module in enumerate(self.mtp, start=1):
            n = T - k  # positions that have a token k ahead
            cos, sin = self.model.rotary_emb(position_ids[:, :n])
            mask = attn_mask[..., :n, :n] if attn_mask is not None else None
            h = module(h[:, :n], self.model.embed_tokens(input_ids[:, k:]), cos, sin, mask)
            logits = self.lm_head(module.shared_head.norm(h))
            losses.append(next_token_ce(logits, labels[:, k:]))
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------ inference (see nanoseek/inference)
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, **kwargs) -> torch.Tensor:
        """transformers-style generation over the latent KV cache; returns prompt + new ids [B, P + new].
        Options (temperature, top_k, top_p, min_p, attention_mask, eos_token_id, stop_strings, seed,
        speculative, ...): `nanoseek.inference.engine.hf_generate`."""
        from nanoseek.inference.engine import hf_generate

        return hf_generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ I/O (see nanoseek/hf.py)
    def save_pretrained(self, path, safe_max_shard_bytes: int = 2 * 1024**3) -> None:
        from nanoseek.hf import save_pretrained

        save_pretrained(self, path, max_shard_bytes=safe_max_shard_bytes)
