"""The explainer: sequence layout, batched generation, stop rules, grounding choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.encoder import EncoderFingerprint
from pipeline.explainer import (
    AFTER_IMAGE,
    ASSISTANT,
    BEFORE_IMAGE,
    Explainer,
    ExplainerConfig,
    Grounding,
    agrees,
    describe_findings,
    question_for,
)
from pipeline.llm import load_llm
from pipeline.postprocess import Region

EMBED_DIM = 12
FINGERPRINT = EncoderFingerprint("defectscope-tiny", "random:0", (2, 4, 6, 8), 224)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llm_dir: Path):
    return load_llm(str(tiny_llm_dir))


@pytest.fixture(scope="module")
def explainer(tiny_llm) -> Explainer:
    return Explainer(tiny_llm, EMBED_DIM, Grounding.IMAGE, max_new_tokens=6)


def test_image_token_and_18_prompts_sit_where_the_sequence_says(explainer: Explainer) -> None:
    torch.manual_seed(0)
    embeddings = torch.randn(2, EMBED_DIM)
    maps = torch.rand(2, 224, 224)
    questions = ["Is there any anomaly in the image?", question_for("washer")]
    with torch.no_grad():
        inputs, mask, layouts = explainer.build_inputs(embeddings, maps, questions)
        image_tokens = explainer.image_projection(embeddings)
        prompts = explainer.prompt_learner(maps)

    hidden = explainer.llm.hidden_size
    assert inputs.shape == (2, layouts[0].length, hidden)
    bos = explainer.embeddings.weight[explainer.llm.tokenizer.bos_token_id]
    before, after = explainer.embed_text(BEFORE_IMAGE), explainer.embed_text(AFTER_IMAGE)
    for index, layout in enumerate(layouts):
        pad = int((mask[index] == 0).sum())
        assert torch.all(inputs[index, :pad] == 0) and mask[index, pad:].all()
        assert torch.allclose(inputs[index, pad], bos)
        assert torch.allclose(inputs[index, pad + 1 : layout.image_position], before)
        assert torch.allclose(inputs[index, layout.image_position], image_tokens[index])
        after_end = layout.image_position + 1 + after.shape[0]
        assert torch.allclose(inputs[index, layout.image_position + 1 : after_end], after)
        assert layout.prompt_start == after_end
        prompt_end = layout.prompt_start + 18
        assert torch.allclose(inputs[index, layout.prompt_start : prompt_end], prompts[index])
        assert layout.question_start == prompt_end
        question = explainer.embed_text(questions[index] + ASSISTANT)
        assert torch.allclose(inputs[index, prompt_end:], question)
    # The longer question is not padded; the shorter one is padded on the left.
    assert mask[1].all() and not mask[0].all()


def test_batched_generation_equals_one_at_a_time(explainer: Explainer) -> None:
    torch.manual_seed(1)
    embeddings, maps = torch.randn(3, EMBED_DIM), torch.rand(3, 224, 224)
    questions = ["Is there any anomaly in the image?", question_for("washer"), "Is there?"]
    with torch.no_grad():
        batched = explainer.generate(*explainer.build_inputs(embeddings, maps, questions)[:2])
        single = [
            explainer.generate(
                *explainer.build_inputs(
                    embeddings[i : i + 1], maps[i : i + 1], questions[i : i + 1]
                )[:2]
            )[0]
            for i in range(3)
        ]
    assert batched == single
    assert all(isinstance(text, str) and 0 <= count <= 6 for text, count in batched)


def test_findings_grounding_puts_the_verdict_in_the_prompt(tiny_llm) -> None:
    explainer = Explainer(tiny_llm, EMBED_DIM, Grounding.FINDINGS, max_new_tokens=4)
    findings = [describe_findings(True, (Region((0, 0, 1, 1), 0.1, "center", 0.9),))]
    inputs, mask, layouts = explainer.build_findings_inputs(findings, ["Is there?"])
    assert layouts[0].image_position is None and layouts[0].prompt_start is None
    ids = tiny_llm.tokenizer(findings[0], add_special_tokens=False).input_ids
    assert inputs.shape[1] > len(ids) and mask.all()
    (explanation,) = explainer.explain(
        torch.zeros(1, EMBED_DIM), torch.zeros(1, 224, 224), ["Is there?"], findings
    )
    assert explanation.grounding is Grounding.FINDINGS
    with pytest.raises(ValueError, match="needs the detector's findings"):
        explainer.explain(torch.zeros(1, EMBED_DIM), torch.zeros(1, 224, 224), ["?"])


def test_grounding_follows_the_checkpoint(tiny_llm, tmp_path: Path) -> None:
    untrained = Explainer.from_config(ExplainerConfig(), tiny_llm, EMBED_DIM, checkpoint=None)
    assert untrained.grounding is Grounding.FINDINGS

    trained_parts = Explainer(tiny_llm, EMBED_DIM, seed=5)
    save_checkpoint(
        tmp_path / "explainer",
        FINGERPRINT,
        {
            "prompt_learner": trained_parts.prompt_learner,
            "image_projection": trained_parts.image_projection,
        },
        llm=tiny_llm.identity,
    )
    checkpoint = load_checkpoint(tmp_path / "explainer", FINGERPRINT, llm=tiny_llm.identity)
    trained = Explainer.from_config(ExplainerConfig(), tiny_llm, EMBED_DIM, checkpoint)
    assert trained.grounding is Grounding.IMAGE
    assert torch.equal(trained.image_projection.weight, trained_parts.image_projection.weight)


def test_stop_rules_cut_the_answer() -> None:
    from pipeline.explainer import _cut_at_stop

    assert (
        _cut_at_stop(" Yes, there is an anomaly.\n### Human: more") == "Yes, there is an anomaly."
    )
    assert _cut_at_stop("No, there is no anomaly in the image.### Assistant") == (
        "No, there is no anomaly in the image."
    )


def test_findings_sentences_and_agreement() -> None:
    regions = (Region((0, 0, 1, 1), 0.1, "top", 0.9), Region((0, 0, 1, 1), 0.1, "left", 0.8))
    assert describe_findings(False, ()) == "Inspection: GOOD, no defect."
    assert (
        describe_findings(True, regions) == "Inspection: DEFECTIVE, 2 defects at the top and left."
    )
    assert agrees("Yes, there is an anomaly", True) and not agrees("No, there is none", True)
    assert question_for(None) == "Is there any anomaly in the image?"


def test_explainer_parts_for_another_llm_are_refused(tiny_llm, tmp_path: Path) -> None:
    from pipeline.errors import CheckpointError

    parts = Explainer(tiny_llm, EMBED_DIM)
    save_checkpoint(
        tmp_path / "other-llm",
        FINGERPRINT,
        {"prompt_learner": parts.prompt_learner, "image_projection": parts.image_projection},
        llm="vicuna-7b:0123456789abcdef",
    )
    checkpoint = load_checkpoint(tmp_path / "other-llm", FINGERPRINT)
    with pytest.raises(CheckpointError, match="made for LLM vicuna-7b"):
        Explainer.from_config(ExplainerConfig(), tiny_llm, EMBED_DIM, checkpoint)
