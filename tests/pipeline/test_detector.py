"""The detector facade on the bundled samples, and checkpoints of the trainable parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.decoder import ZeroShotDecoder
from pipeline.detector import AnswerSource, Detector, DetectorConfig, ExplainPolicy, choose_answer
from pipeline.encoder import EncoderConfig, EncoderFingerprint
from pipeline.errors import BankError, CheckpointError, ConfigError
from pipeline.explainer import ExplainerConfig
from pipeline.memory import MemoryBank

DEFECTS = ("chip", "crack", "rust", "scratch")
GOOD = ("good_00", "good_01", "good_02")


@pytest.fixture(scope="module")
def bank(detector: Detector, normal_images) -> MemoryBank:
    return detector.build_bank(normal_images)


def test_bank_holds_every_patch_of_every_reference(bank: MemoryBank, detector: Detector) -> None:
    assert bank.num_patches == (8 * detector.encoder.num_patches,) * 4
    assert bank.threshold is not None and bank.threshold > 0


def test_painted_defects_score_above_every_good_part(detector, bank, test_images) -> None:
    names = [*GOOD, *DEFECTS]
    results = dict(
        zip(names, detector.inspect([test_images[n] for n in names], bank=bank), strict=True)
    )
    highest_good = max(results[name].score for name in GOOD)
    lowest_defect = min(results[name].score for name in DEFECTS)
    assert lowest_defect > highest_good
    assert all(results[name].anomalous for name in DEFECTS)
    assert not any(results[name].anomalous for name in GOOD)
    assert all(results[name].regions == () for name in GOOD)


@pytest.mark.parametrize(
    ("name", "location"),
    [("crack", "right"), ("rust", "bottom left"), ("chip", "top"), ("scratch", "top right")],
)
def test_regions_say_where_the_defect_was_painted(
    detector, bank, test_images, name, location
) -> None:
    (result,) = detector.inspect([test_images[name]], bank=bank)
    strongest = result.regions[0]
    assert strongest.location == location
    assert (
        result.answer == f"Yes, there is an anomaly in the image, at the {location} of the image."
    )
    assert result.answer_source is AnswerSource.REGIONS
    x0, y0, x1, y1 = strongest.box
    assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
    assert result.score == pytest.approx(float(result.anomaly_map.max()))


def test_results_carry_maps_timings_and_sizes(detector, bank, test_images) -> None:
    image = test_images["good_00"].resize((320, 200))
    (result,) = detector.inspect([image], bank=bank)
    assert result.anomaly_map.shape == (224, 224) and result.anomaly_map.dtype == np.float32
    assert result.image_size == (320, 200)
    assert result.timings.encode > 0 and result.timings.few_shot > 0
    assert result.timings.total >= result.timings.encode
    payload = result.to_dict()
    assert set(payload) >= {"score", "anomalous", "regions", "answer", "timings"}


def test_fixed_threshold_overrides_the_calibrated_one(normal_images, bank, test_images) -> None:
    strict = Detector(DetectorConfig(device="cpu", threshold=10.0))
    (result,) = strict.inspect([test_images["rust"]], bank=bank)
    assert result.threshold == 10.0 and not result.anomalous


def test_topk_scores_are_at_most_max_scores(normal_images, bank, test_images) -> None:
    topk = Detector(DetectorConfig(device="cpu", score_mode="topk"))
    plain = Detector(DetectorConfig(device="cpu"))
    image = [test_images["crack"]]
    assert topk.inspect(image, bank=bank)[0].score <= plain.inspect(image, bank=bank)[0].score


def test_bank_with_augmentation_and_coreset(detector, normal_images) -> None:
    augmented = detector.build_bank(normal_images[:2], augment=True, coreset_ratio=0.5)
    assert augmented.num_patches[0] == 2 * 4 * 256 // 2


def test_single_reference_has_no_calibrated_threshold(detector, normal_images) -> None:
    assert detector.build_bank(normal_images[:1]).threshold is None


def test_empty_reference_list_is_refused(detector) -> None:
    with pytest.raises(BankError, match="at least one normal image"):
        detector.build_bank([])


def test_bank_from_another_encoder_is_refused(detector, test_images) -> None:
    alien = MemoryBank([torch.randn(10, 64)] * 4)
    with pytest.raises(BankError, match="built with another encoder"):
        detector.inspect([test_images["good_00"]], bank=alien)


def test_no_bank_and_no_trained_decoder_is_refused(detector, test_images) -> None:
    with pytest.raises(ConfigError, match="nothing to compare against"):
        detector.inspect([test_images["good_00"]])


def test_llm_answers_follow_the_policy(tiny_llm_dir: Path, normal_images, test_images) -> None:
    config = DetectorConfig(
        device="cpu",
        explainer=ExplainerConfig(llm=str(tiny_llm_dir), max_new_tokens=4),
        explain=ExplainPolicy.ANOMALOUS,
    )
    explaining = Detector(config)
    bank = explaining.build_bank(normal_images)
    good, rust = explaining.inspect([test_images["good_00"], test_images["rust"]], bank=bank)
    assert good.answer_source is AnswerSource.REGIONS
    # A random tiny LLM rarely says "Yes": its answer is then replaced by the regions' answer.
    assert rust.answer.startswith("Yes")
    assert rust.timings.explain > 0


def test_an_answer_that_contradicts_the_verdict_is_replaced() -> None:
    from pipeline.detector import Verdict
    from pipeline.postprocess import Region

    verdict = Verdict(0.9, True, 0.5, (Region((0, 0, 1, 1), 0.1, "top", 0.9),))
    assert choose_answer("Yes, there is an anomaly in the image.", verdict)[1] is AnswerSource.LLM
    text, source = choose_answer("No, there is no anomaly in the image.", verdict)
    assert source is AnswerSource.REGIONS and text.startswith("Yes")


def test_decoder_checkpoint_round_trip(tmp_path: Path, detector: Detector, test_images) -> None:
    decoder = ZeroShotDecoder(detector.encoder.vision_width, detector.encoder.embed_dim, 4, seed=9)
    save_checkpoint(tmp_path / "ckpt", detector.encoder.fingerprint, {"decoder": decoder})
    loaded = Detector(DetectorConfig(device="cpu", checkpoint=str(tmp_path / "ckpt")))
    assert loaded.has_trained_decoder
    assert torch.equal(loaded.decoder.projections[2].weight, decoder.projections[2].weight)
    (result,) = loaded.inspect([test_images["good_00"]])  # zero-shot only: no bank needed
    assert 0.0 <= result.score <= 1.0


def test_checkpoint_for_another_encoder_is_refused(tmp_path: Path, detector: Detector) -> None:
    other = EncoderFingerprint("defectscope-tiny", "random:1", (2, 4, 6, 8), 224)
    decoder = ZeroShotDecoder(detector.encoder.vision_width, detector.encoder.embed_dim, 4)
    save_checkpoint(tmp_path / "other", other, {"decoder": decoder})
    with pytest.raises(CheckpointError) as error:
        Detector(DetectorConfig(device="cpu", checkpoint=str(tmp_path / "other")))
    assert "weights random:1 vs random:0" in str(error.value)
    with pytest.raises(CheckpointError, match="made for LLM a, but this one is b"):
        save_checkpoint(tmp_path / "llm", other, {"decoder": decoder}, llm="a")
        load_checkpoint(tmp_path / "llm", other, llm="b")


def test_unreadable_checkpoints_are_refused(tmp_path: Path, detector: Detector) -> None:
    fingerprint = detector.encoder.fingerprint
    with pytest.raises(CheckpointError, match="not a defectscope checkpoint"):
        load_checkpoint(tmp_path, fingerprint)
    decoder = ZeroShotDecoder(detector.encoder.vision_width, 7, 4)
    save_checkpoint(tmp_path / "shape", fingerprint, {"decoder": decoder})
    with pytest.raises(CheckpointError, match="decoder weights do not fit"):
        Detector(DetectorConfig(device="cpu", checkpoint=str(tmp_path / "shape")))


def test_detector_is_deterministic(normal_images, test_images) -> None:
    first = Detector(DetectorConfig(device="cpu", encoder=EncoderConfig(seed=2)))
    second = Detector(DetectorConfig(device="cpu", encoder=EncoderConfig(seed=2)))
    bank_one, bank_two = first.build_bank(normal_images[:3]), second.build_bank(normal_images[:3])
    score_one = first.inspect([test_images["crack"]], bank=bank_one)[0].score
    score_two = second.inspect([test_images["crack"]], bank=bank_two)[0].score
    assert score_one == score_two
