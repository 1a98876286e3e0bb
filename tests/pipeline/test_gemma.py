"""Gemma 3 270M, the embedded LLM, end to end: GGUF -> cached safetensors -> answers.

The first run converts the GGUF (about a minute on two cores); later runs read the cache.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.detector import AnswerSource, Detector, DetectorConfig, ExplainPolicy
from pipeline.explainer import Explainer, ExplainerConfig, Grounding
from pipeline.llm import EMBEDDED_LLM, load_llm, resolve_llm

pytestmark = [pytest.mark.slow, pytest.mark.llm]


@pytest.fixture(scope="module")
def gemma():
    return load_llm(EMBEDDED_LLM)


def test_the_gguf_is_converted_once_to_plain_safetensors(gemma) -> None:
    directory, identity = resolve_llm(EMBEDDED_LLM)
    assert identity == gemma.identity and identity.startswith("gemma3-270m:")
    assert (directory / "model.safetensors").is_file()
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "gemma3_text" and config["hidden_size"] == 640


def test_gemma_answers_through_the_anomalygpt_sequence(gemma) -> None:
    explainer = Explainer(gemma, embed_dim=128, grounding=Grounding.IMAGE, max_new_tokens=12)
    with torch.no_grad():
        inputs, mask, layouts = explainer.build_inputs(
            torch.randn(2, 128), torch.rand(2, 224, 224), ["Is there any anomaly in the image?"] * 2
        )
    assert inputs.shape[2] == 640 and layouts[0].prompt_start - layouts[0].image_position > 1
    answers = explainer.generate(inputs, mask)
    assert len(answers) == 2 and all(0 < count <= 12 for _, count in answers)


def test_detector_explains_painted_defects_with_gemma(normal_images, test_images) -> None:
    detector = Detector(
        DetectorConfig(
            device="cpu",
            explainer=ExplainerConfig(llm=EMBEDDED_LLM),
            explain=ExplainPolicy.ALWAYS,
        )
    )
    bank = detector.build_bank(normal_images)
    names = ["rust", "crack", "good_00"]
    results = dict(
        zip(names, detector.inspect([test_images[n] for n in names], bank=bank), strict=True)
    )
    assert results["rust"].answer_source is AnswerSource.LLM
    assert results["rust"].answer == (
        "Yes, there is an anomaly in the image, at the bottom left of the image."
    )
    assert results["crack"].answer.startswith("Yes")
    assert results["good_00"].answer.startswith("No")
    assert all(result.timings.explain > 0 for result in results.values())
