"""`nanoseek chat`: an interactive chat REPL over the tokenizer's chat template, streaming each reply.

    nanoseek chat --model runs/r1 [--no-think] [--system "You are terse."] [--speculative]

R1-style replies are `<think> reasoning </think> <answer> answer </answer>`. The reasoning streams
dim and italic after a `thinking:` label (plain text when stdout is not a terminal), the answer after
`assistant:`; `--no-think` hides the reasoning. The tags themselves are not printed. Earlier turns go
back into the prompt without their reasoning, as DeepSeek-R1's template does. Messages are user text:
control tokens typed into them (`<|eos|><|system|>...`) are encoded as plain characters, so a message
cannot forge a turn (`Tokenizer.encode_chat`).
Commands: /reset forgets the conversation, /exit (or end of input) leaves; Ctrl-C cuts a reply short.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rich.console import Console

from nanoseek.errors import UserError
from nanoseek.inference.cli import TextStream, add_sampling_arguments, checked_text, setup
from nanoseek.inference.engine import Generation

HELP = "commands: /reset (new conversation), /exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, temperature=0.6, top_p=0.95, max_new_tokens=512)
    parser.add_argument("--no-think", action="store_true", help="hide the <think> part of replies")
    parser.add_argument("--system", help="system message for the conversation")


class ReplyView:
    """Prints a streamed reply: reasoning dim/italic (or hidden), answer plain, tags dropped."""

    def __init__(self, console, tokenizer, show_think: bool):
        self.console, self.tok, self.show_think = console, tokenizer, show_think
        self.think, self.end_think = tokenizer.token_id("<think>"), tokenizer.token_id("</think>")
        self.hidden = {tokenizer.token_id("<answer>"), tokenizer.token_id("</answer>"), tokenizer.eos_id}
        self.text = TextStream(tokenizer.decode)
        self.section: str | None = None  # "think" or "answer"
        self.answer_ids: list[int] = []

    def _enter(self, section: str) -> None:
        if self.section is not None and (self.section != "think" or self.show_think):
            self.console.print()
        if section == "answer" or self.show_think:
            label = "assistant: " if section == "answer" else "thinking: "
            self.console.print(label, end="", style="bold" if section == "answer" else "dim")
        self.section = section

    def push(self, token: int) -> None:
        if token == self.think:
            self._enter("think")
            return
        if token == self.end_think:
            self._enter("answer")
            return
        if self.section is None:
            self._enter("answer")
        if self.section == "answer":
            self.answer_ids.append(token)
        if token in self.hidden:
            return
        self._show(self.text.push(token))

    def _show(self, text: str) -> None:
        if text and (self.section == "answer" or self.show_think):
            self.console.print(text, end="", style="dim italic" if self.section == "think" else None)

    def finish(self) -> str:
        """End the reply; returns the answer text that goes back into the conversation."""
        self._show(self.text.flush())
        self.console.print()
        return self.tok.decode([t for t in self.answer_ids if t != self.tok.eos_id]).strip()


class ChatSession:
    """The conversation so far and how to turn it into a prompt that fits the context."""

    def __init__(self, tokenizer, context: int, system: str | None = None):
        self.tok, self.context = tokenizer, context
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def prompt(self, user: str, room: int) -> list[int]:
        """Token ids for the conversation plus `user`, dropping the oldest turns if it would leave
        fewer than `room` tokens of context. Raises UserError when even the new message alone is too long."""
        self.turns.append({"role": "user", "content": user})
        while True:
            ids = self.tok.encode_chat(self.system + self.turns, add_generation_prompt=True)
            if len(ids) + room <= self.context or len(ids) < self.context and len(self.turns) == 1:
                return ids
            if len(self.turns) == 1:
                self.turns.pop()
                raise UserError(f"message too long: {len(ids)} tokens, the model's context is {self.context}")
            self.turns = self.turns[2:]  # forget the oldest exchange

    def reply(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})


def run(args: argparse.Namespace, read_line: Callable[[str], str] | None = None) -> int:
    read_line = read_line or input
    if args.system is not None:
        checked_text(args.system, "--system")
    model, tokenizer, params = setup(args)
    console = Console(file=sys.stdout, highlight=False, markup=False, soft_wrap=True)
    session = ChatSession(tokenizer, model.config.max_position_embeddings, args.system)
    console.print(f"nanoseek chat: {args.model} ({HELP})", style="dim")
    turn = 0
    while True:
        try:
            line = read_line("you> ").strip()
        except EOFError:
            console.print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.turns.clear()
            console.print("(conversation reset)", style="dim")
            continue
        if not line:
            continue
        try:
            prompt = session.prompt(checked_text(line, "the message"), room=min(params.max_new_tokens, 64))
        except UserError as e:
            console.print(f"error: {e}", style="red")
            continue
        if args.seed is not None:
            params.seed = args.seed + turn
        view = ReplyView(console, tokenizer, show_think=not args.no_think)
        try:
            for event in Generation(model, [prompt], params, eos_token_id=tokenizer.eos_id,
                                    speculative=args.speculative, compile=args.compile):
                view.push(event.token_id)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the session
            console.print(" (interrupted)", style="dim", end="")
        session.reply(view.finish())
        turn += 1
