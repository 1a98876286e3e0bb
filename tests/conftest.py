"""Fixtures shared by every test package: the tiny encoder and detector, the bundled samples, and a
tiny random causal LM with a real (locally trained) tokenizer."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.detector import Detector, DetectorConfig
from pipeline.encoder import Encoder, EncoderConfig, load_encoder
from pipeline.images import load_image

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
SAMPLES = Path(__file__).resolve().parents[1] / "pipeline" / "samples"
TINY_LLM_CORPUS = [
    "### Human: <Img> </Img> Is there any anomaly in the image?",
    "### Assistant: No, there is no anomaly in the image.",
    "Yes, there is an anomaly in the image, at the top left of the image.",
    "Yes, there are 2 anomalies in the image, at the top, top right, left, center, right, bottom "
    "left, bottom and bottom right of the image.",
    "This is a photo of a washer for anomaly detection.",
    "Inspection: DEFECTIVE, a defect at the center. Inspection: GOOD, no defect.",
]


@pytest.fixture(scope="session")
def tiny_encoder() -> Encoder:
    return load_encoder(EncoderConfig(), device="cpu")


@pytest.fixture(scope="session")
def detector() -> Detector:
    return Detector(DetectorConfig(device="cpu"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def normal_images() -> list[Image.Image]:
    return [load_image(path) for path in sorted((SAMPLES / "normal").glob("*.jpg"))]


@pytest.fixture(scope="session")
def test_images() -> dict[str, Image.Image]:
    """The bundled test images by stem: good_00..02 and the painted defects."""
    return {path.stem: load_image(path) for path in sorted((SAMPLES / "test").glob("*.jpg"))}


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with seeded random weights and a word-level tokenizer, saved as a
    transformers directory (what a user would point --llm at)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llm")
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.train_from_iterator(
        TINY_LLM_CORPUS, trainers.WordLevelTrainer(special_tokens=specials)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis: `$REDIS_URL`, else 127.0.0.1:6379 when it answers, else an embedded server
    in a temporary directory for the session."""
    from bankstore import EmbeddedRedis, RedisUnavailableError, connect

    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    try:
        connect(LOCAL_REDIS, retries=0).close()
    except RedisUnavailableError:
        server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
        yield server.start()
        server.stop()
    else:
        yield LOCAL_REDIS


@pytest.fixture
def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"
