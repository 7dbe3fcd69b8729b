"""`medlora chat` (interactive, streaming, multi-turn) and `medlora generate` (a JSONL file, batched).

Both format prompts with the run's own chat template and system prompt (see serve/prompt.py), so
what a user sees here is what the server and the evaluation produce for the same question.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlora.data.tabular import read_jsonl
from medlora.errors import DataError
from medlora.io import write_jsonl_atomic
from medlora.serve.engine import Event, Job
from medlora.serve.loader import Served, sampling_for
from medlora.serve.prompt import conversation_ids
from medlora.serve.safety import Safety

HELP = "Type a question. /reset starts a new conversation, /exit (or Ctrl-D) quits."


class Chat:
    """A conversation with one served model; `ask` streams the answer and remembers the turn."""

    def __init__(
        self, served: Served, max_new_tokens: int | None = None, model: str | None = None
    ) -> None:
        self.served = served
        self.model = model or served.default_model
        self.entry = served.models[self.model]
        self.max_new_tokens = max_new_tokens or self.entry.generation.max_new_tokens
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, question: str) -> list[int]:
        messages = [*self.history, {"role": "user", "content": question}]
        return conversation_ids(self.entry.tokenizer, messages, self.entry.system_prompt)

    def ask(self, question: str, on_piece: Callable[[str], None] = lambda piece: None) -> str:
        """Generate in the engine's thread, hand pieces to `on_piece` as they come; Ctrl-C stops it."""
        events: queue.Queue[Event] = queue.Queue()
        job = Job(
            self.model,
            self.prompt_ids(question),
            sampling_for(self.entry, self.max_new_tokens),
            sink=events.put,
            adapter=self.entry.adapter,
        )
        worker = threading.Thread(target=self.served.engine.run_batch, args=([job],), daemon=True)
        worker.start()
        try:
            while (event := events.get()).kind == "token":
                on_piece(event.text)
        except KeyboardInterrupt:
            job.cancel()
        worker.join()
        if job.finish_reason == "error":
            raise RuntimeError(event.text)
        self.history += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": job.text},
        ]
        return job.text


def chat_loop(
    chat: Chat, console: Any, read: Callable[[str], str] = input, safety: Safety | None = None
) -> None:
    """Read questions until /exit or end of input; stream each answer to the console."""
    safety = safety or Safety()
    console.print(
        f"[bold]medlora chat[/] with [cyan]{chat.model}[/] ({chat.served.engine.name}). {HELP}"
    )
    if safety.disclaimer:
        console.print(f"[dim]{safety.disclaimer}[/]")
    while True:
        try:
            question = read("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            chat.reset()
            console.print("[dim](new conversation)[/]")
            continue
        if question.startswith("/"):
            console.print(f"[dim]unknown command {question}. {HELP}[/]")
            continue
        console.print("[bold green]medlora>[/] ", end="")
        notice = safety.notice(question)
        if notice:
            console.print(f"[bold red]⚠️ {notice}[/]\n")

        def show(piece: str) -> None:
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

        chat.ask(question, show)
        console.print()


def read_questions(path: Path) -> list[dict[str, Any]]:
    """JSONL rows with a `question` (other fields, e.g. `id`, are copied to the answers)."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise DataError(
                f'{path}:{number} has no "question" text; each line needs {{"question": "..."}}'
            )
    if not rows:
        raise DataError(f"{path} holds no questions")
    return rows


def generate_file(
    spec: str,
    adapter: str | os.PathLike[str] | None,
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """Answer every question of a JSONL file in batches (greedy, merged weights); write JSONL."""
    from medlora.evaluate.generate import generate_answers
    from medlora.evaluate.heldout import run_recipe
    from medlora.models import load_model, load_with_adapter
    from medlora.serve.loader import model_id

    rows = read_questions(Path(in_path))
    if adapter:
        peft_model, tokenizer = load_with_adapter(spec, adapter)
        model, name = peft_model.merge_and_unload(), Path(adapter).resolve().name
    else:
        (model, tokenizer), name = load_model(spec), model_id(spec)
    recipe = run_recipe(adapter)  # the run's system prompt and generation settings
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = [row["question"] for row in rows[start : start + batch_size]]
        answers += generate_answers(
            model,
            tokenizer,
            chunk,
            recipe.data.system_prompt,
            recipe.generation,
            batch_size,
            show_progress=False,
            max_new_tokens=max_new_tokens,
        )
        log(f"{len(answers)}/{len(rows)} answered")
    out = [
        {**row, "answer": answer, "model": name} for row, answer in zip(rows, answers, strict=True)
    ]
    write_jsonl_atomic(out_path, out)
    return out
