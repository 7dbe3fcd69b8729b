"""Small builders shared by tests (records, prepared split folders, a LoRA on the tiny model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlora.data.records import Record
from medlora.io import write_jsonl_atomic

QA = [
    (
        "What are the symptoms of asthma?",
        "Wheezing, coughing, chest tightness and shortness of breath.",
    ),
    ("How is diabetes treated?", "Diet, exercise, blood sugar monitoring, metformin or insulin."),
    ("What causes anemia?", "Low iron, vitamin B12 deficiency, blood loss or chronic disease."),
    ("Is hypertension inherited?", "High blood pressure often runs in families."),
    ("What is the outlook for people with migraine?", "Most people manage attacks with treatment."),
]


def tiny_records(copies: int = 4) -> list[Record]:
    records = []
    for c in range(copies):
        for i, (question, answer) in enumerate(QA):
            records.append(
                Record(
                    id=f"q{i}-{c}",
                    question=question,
                    answer=answer,
                    source="test/tiny",
                    topic=f"t{i}-{c}",
                )
            )
    return records


def write_prepared(
    folder: Path, train: list[Record], validation: list[Record], test: list[Record]
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        write_jsonl_atomic(folder / f"{name}.jsonl", [r.to_dict() for r in rows])
    return folder


def lora_on_q_v(model: Any) -> Any:
    """`model` with a rank-4 LoRA on q_proj/v_proj whose B is random, not zero: the adapter changes
    the outputs and every LoRA weight gets a gradient."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model
