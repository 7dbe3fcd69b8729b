"""The two panels (held-out topics | sources never trained on): rows, the transfer sentence, and the
card and page that show them."""

from __future__ import annotations

from pathlib import Path

import yaml

from medlora.report.format import metric_verdict
from medlora.report.panels import panel_rows, panels_markdown, transfer_sentence
from medlora.results import CI, EvalResult, MetricCI, PanelScores, QualityResult, write_result


def _ci(mean: float, half: float) -> CI:
    return CI(mean=mean, low=mean - half, high=mean + half)


def _panel(panel: str, rouge_gain: float, words: tuple[float, float], loss: float) -> PanelScores:
    metrics = {
        "rougeL": MetricCI(
            model=_ci(0.2 + rouge_gain, 0.01), base=_ci(0.2, 0.01), diff=_ci(rouge_gain, 0.01)
        ),
        "repetition": MetricCI(model=_ci(0.02, 0.01), base=_ci(0.02, 0.01), diff=_ci(0.0, 0.01)),
        "length": MetricCI(
            model=_ci(words[1], 3), base=_ci(words[0], 3), diff=_ci(words[1] - words[0], 3)
        ),
    }
    quality = QualityResult(
        examples=50,
        decoding="greedy",
        max_new_tokens=128,
        empty_predictions=0,
        metrics=metrics,
        reference_words=200.0,
    )
    return PanelScores(
        panel=panel,
        data=[f"{panel}-source"],
        loss=loss,
        base_loss=2.4,
        perplexity=9.0,
        base_perplexity=11.0,
        answer_tokens=5000,
        examples=50,
        loss_change_pct=(loss - 2.4) / 2.4 * 100,
        examples_better=40,
        quality=quality,
    )


def test_length_differences_read_longer_or_shorter_never_better() -> None:
    assert metric_verdict("length", _ci(12.0, 3)) == "longer"
    assert metric_verdict("length", _ci(-12.0, 3)) == "shorter"
    assert metric_verdict("length", _ci(1.0, 3)) == "no significant change"
    assert metric_verdict("repetition", _ci(-0.05, 0.01)) == "better"  # lower is better


def test_the_sentence_says_what_transferred_and_what_did_not() -> None:
    test = _panel("test", 0.05, (80, 85), 2.1)
    unseen = _panel("unseen", 0.0, (80, 60), 2.2)
    sentence = transfer_sentence(test, unseen)
    assert "better on ROUGE-L" in sentence and "answers shorter" in sentence
    assert "improved only on topics of the trained sources" in sentence
    assert "lower answer loss transferred" in sentence
    both = transfer_sentence(test, _panel("unseen", 0.04, (80, 82), 2.2))
    assert "improved on both" in both
    neither = transfer_sentence(_panel("test", 0.0, (80, 80), 2.5), unseen)
    assert "no answer metric improved significantly on either panel" in neither


def test_rows_put_the_panels_side_by_side_with_the_reference_length() -> None:
    test, unseen = _panel("test", 0.05, (80, 85), 2.1), _panel("unseen", 0.0, (80, 60), 2.2)
    rows = panel_rows([test, unseen])
    names = [r.name for r in rows]
    assert names[0].startswith("answer loss") and names[-1].startswith("reference answers")
    assert all(len(r.cells) == 2 for r in rows)
    rouge = rows[names.index("ROUGE-L (F)")]
    assert [c.verdict for c in rouge.cells] == ["better", "no significant change"]
    assert rows[0].cells[0].diff == "-12.5 %" and rows[0].cells[1].diff == "-8.3 %"
    table = panels_markdown([test, unseen])
    header = next(line for line in table if line.startswith("| metric"))
    assert header.count("test:") == 3 and header.count("unseen:") == 3
    length = next(line for line in table if line.startswith("| answer length"))
    assert "shorter" in length and "80.0" in length


def test_card_and_page_show_both_panels_from_eval_json(tmp_path: Path) -> None:
    from medlora.config import Recipe
    from medlora.report.card import write_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(Recipe().model_dump(mode="json")))
    test, unseen = _panel("test", 0.05, (80, 85), 2.1), _panel("unseen", 0.0, (80, 60), 2.2)
    evaluation = EvalResult(
        model="m",
        data=test.data,
        split="test",
        loss=test.loss,
        base_loss=test.base_loss,
        perplexity=test.perplexity,
        base_perplexity=test.base_perplexity,
        examples=50,
        answer_tokens=5000,
        quality=test.quality,
        unseen=unseen,
    )
    write_result(run / "eval.json", evaluation)
    paths = write_report(run)
    card = paths["card"].read_text()
    assert "Where the fine-tune helps and where it does not" in card
    assert transfer_sentence(test, unseen) in card
    assert "| metric | test: base |" in card and "unseen: difference" in card
    page = paths["html"].read_text()
    assert 'id="panels"' in page and "sources never trained on" in page
    # Without the second panel the card keeps its one-split tables.
    write_result(run / "eval.json", evaluation.model_copy(update={"unseen": None}))
    card = write_report(run)["card"].read_text()
    assert "Where the fine-tune helps" not in card and "Answer quality" in card


def test_card_and_page_show_the_judge_and_the_audit_when_the_run_has_them(tmp_path: Path) -> None:
    from medlora.config import Recipe
    from medlora.report.card import write_report
    from medlora.results import (
        AuditResult,
        CanaryExposure,
        ExposureAudit,
        JudgeResult,
        PairwiseJudgment,
        RecitationAudit,
        SpanStats,
    )

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(Recipe().model_dump(mode="json")))
    judge = JudgeResult(
        judge_model="weak-judge",
        judge_url="http://127.0.0.1:9/v1",
        predictions="p.jsonl",
        examples=10,
        requests=40,
        cached=0,
        cache="cache.jsonl",
        pairwise=PairwiseJudgment(
            pairs=10,
            unparseable=1,
            win=_ci(0.4, 0.1),
            tie=_ci(0.3, 0.1),
            loss=_ci(0.3, 0.1),
            win_minus_loss=_ci(0.1, 0.2),
            consistent=6,
            position_consistency=6 / 9,
        ),
    )
    test = _panel("test", 0.05, (80, 85), 2.1)
    write_result(
        run / "eval.json",
        EvalResult(
            model="m",
            data="d",
            split="test",
            loss=2.1,
            base_loss=2.4,
            examples=50,
            quality=test.quality,
            judge=judge,
        ),
    )
    spans = SpanStats(
        answers=100,
        reciting=3,
        reciting_share=_ci(0.03, 0.02),
        mean=_ci(12.0, 2.0),
        median=10.0,
        p90=30.0,
        max=61,
        histogram={"0–19 tokens": 80, "≥ 50 tokens": 3},
    )
    audit = AuditResult(
        run=str(run),
        model="m",
        recitation=RecitationAudit(
            threshold_tokens=50, train=spans, base_train=spans, train_change=_ci(0.0, 1.0)
        ),
        exposure=ExposureAudit(
            digits=4,
            candidates=10_000,
            max_exposure=13.29,
            seconds_per_canary=1.0,
            canaries=[
                CanaryExposure(
                    id="c20", repeats=20, rank=1, exposure=13.29, base_rank=5000, base_exposure=1.0
                )
            ],
        ),
        elapsed_s=1.0,
    )
    write_result(run / "audit.json", audit)
    paths = write_report(run)
    card, page = paths["card"].read_text(), paths["html"].read_text()
    assert "### Judged answers" in card and "weak-judge at http://127.0.0.1:9/v1" in card
    assert "| win | 0.400 [0.300, 0.500] |" in card
    assert "### Memorization audit" in card and "canary seen 20 times: exposure 13.3" in card
    assert 'id="judge"' in page and 'id="audit"' in page
    (run / "audit.json").unlink()
    write_result(run / "eval.json", EvalResult(model="m", data="d", split="test"))
    card = write_report(run)["card"].read_text()
    assert "Judged answers" not in card and "Memorization audit" not in card
