"""The explainer: a causal LM answers "Is there any anomaly in the image?" for a frame.

The input embeddings follow AnomalyGPT:

    BOS, "### Human: <Img>", image token, "</Img> ", 9 base + 9 map prompts, question,
    "\\n### Assistant:"

where the image token is the final image embedding through a linear projection and the 18 prompts
come from the prompt learner. Answers read "No, there is no anomaly in the image." or "Yes, there
is an anomaly in the image, at the top left of the image."

The projection and prompt learner must be trained (`defectscope train explainer`) before the LLM
can read the image from them. Until a checkpoint supplies them, the explainer runs in "findings"
grounding: the soft prompts are left out and the detector's findings are put into the question as
text, so the LLM phrases what the detector found instead of guessing from untrained embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import nn

from pipeline.checkpoint import Checkpoint
from pipeline.errors import CheckpointError
from pipeline.llm import EMBEDDED_LLM, LoadedLLM
from pipeline.postprocess import Region, join_words
from pipeline.prompt_learner import PromptLearner

logger = logging.getLogger(__name__)

DEFAULT_QUESTION = "Is there any anomaly in the image?"
BEFORE_IMAGE = "### Human: <Img>"
AFTER_IMAGE = "</Img> "
ASSISTANT = "\n### Assistant:"
STOP_STRINGS = ("###", "\n")
FINDINGS_EXAMPLES = (
    (
        "DEFECTIVE, 2 defects at the left and top",
        "Yes, there are 2 anomalies in the image, at the left and top of the image.",
    ),
    ("GOOD, no defect", "No, there is no anomaly in the image."),
    (
        "DEFECTIVE, a defect at the bottom right",
        "Yes, there is an anomaly in the image, at the bottom right of the image.",
    ),
    ("GOOD, no defect", "No, there is no anomaly in the image."),
)
"""Worked examples that put a small base LLM into the answer format (findings grounding)."""


class Grounding(StrEnum):
    """What the LLM is given about the frame."""

    AUTO = "auto"
    """IMAGE when a checkpoint holds trained soft-prompt weights, else FINDINGS."""
    IMAGE = "image"
    """AnomalyGPT: the image token and the 18 soft prompts."""
    FINDINGS = "findings"
    """The detector's regions as text in the question; no soft prompts."""


@dataclass(frozen=True)
class ExplainerConfig:
    """The explainer's LLM and how it is prompted."""

    llm: str | None = EMBEDDED_LLM
    """"gemma3-270m", a .gguf file or a transformers directory; None answers from the regions."""
    checkpoint: str | None = None
    """A checkpoint with trained `prompt_learner` and `image_projection` parts."""
    grounding: Grounding = Grounding.AUTO
    max_new_tokens: int = 40
    question: str = DEFAULT_QUESTION
    seed: int = 0
    """Seed for the untrained soft-prompt weights."""


@dataclass(frozen=True)
class SequenceLayout:
    """Where the pieces of one sample sit in the (left-padded) input sequence."""

    image_position: int | None
    """Index of the image token; None in findings grounding."""
    prompt_start: int | None
    """Index of the first of the 18 prompt embeddings; None in findings grounding."""
    question_start: int
    length: int
    """Padded sequence length."""


@dataclass(frozen=True)
class Explanation:
    """One generated answer."""

    text: str
    new_tokens: int
    grounding: Grounding


class Explainer(nn.Module):
    """Prompt learner + image projection + a frozen causal LM, with batched generation."""

    def __init__(
        self,
        llm: LoadedLLM,
        embed_dim: int,
        grounding: Grounding = Grounding.IMAGE,
        max_new_tokens: int = 40,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.grounding = Grounding(grounding)
        self.max_new_tokens = max_new_tokens
        hidden = llm.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.image_projection = nn.Linear(embed_dim, hidden)
            self.prompt_learner = PromptLearner(hidden)
        device = self.embeddings.weight.device
        self.image_projection.to(device)
        self.prompt_learner.to(device).eval()

    @classmethod
    def from_config(
        cls, config: ExplainerConfig, llm: LoadedLLM, embed_dim: int, checkpoint: Checkpoint | None
    ) -> Explainer:
        """Builds the explainer, loading the soft-prompt parts when the checkpoint has them."""
        trained = checkpoint is not None and all(
            checkpoint.has(part) for part in ("prompt_learner", "image_projection")
        )
        if trained and checkpoint.llm is not None and checkpoint.llm != llm.identity:
            raise CheckpointError(
                f"{checkpoint.path}: explainer parts made for LLM {checkpoint.llm}, but the "
                f"configured LLM is {llm.identity}"
            )
        grounding = Grounding(config.grounding)
        if grounding is Grounding.AUTO:
            grounding = Grounding.IMAGE if trained else Grounding.FINDINGS
        if grounding is Grounding.IMAGE and not trained:
            logger.warning(
                "explainer soft prompts are untrained: answers are not grounded in the image "
                "(train with `defectscope train explainer`)"
            )
        if grounding is Grounding.FINDINGS:
            logger.warning(
                "explainer has no trained soft prompts: the LLM phrases the detector's findings "
                "(train with `defectscope train explainer` to let it read the image)"
            )
        explainer = cls(llm, embed_dim, grounding, config.max_new_tokens, config.seed)
        if trained:
            checkpoint.load_into("prompt_learner", explainer.prompt_learner)
            checkpoint.load_into("image_projection", explainer.image_projection)
        return explainer

    @property
    def embeddings(self) -> nn.Embedding:
        return self.llm.model.get_input_embeddings()

    def embed_text(self, text: str) -> torch.Tensor:
        """(T, hidden) input embeddings of `text`, no special tokens, scaled as the LLM does."""
        ids = self.llm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        return self.embeddings(ids.to(self.embeddings.weight.device))[0]

    def _bos(self) -> torch.Tensor:
        bos = self.llm.tokenizer.bos_token_id
        if bos is None:
            return self.embeddings.weight[:0]
        return self.embeddings(torch.tensor([bos], device=self.embeddings.weight.device))

    def build_inputs(
        self,
        image_embeddings: torch.Tensor,
        anomaly_maps: torch.Tensor,
        questions: list[str],
    ) -> tuple[torch.Tensor, torch.Tensor, list[SequenceLayout]]:
        """Assembles the AnomalyGPT input sequences, left-padded into one batch.

        Args:
            image_embeddings: (B, C_emb) final image embeddings.
            anomaly_maps: (B, S, S) maps for the prompt learner.
            questions: B question strings.

        Returns:
            inputs_embeds (B, T, hidden), attention_mask (B, T), one layout per sample.
        """
        weight = self.embeddings.weight
        image_tokens = self.image_projection(image_embeddings.to(weight.device, weight.dtype))
        prompts = self.prompt_learner(anomaly_maps.to(weight.device))  # (B, 18, hidden)
        before, after = self.embed_text(BEFORE_IMAGE), self.embed_text(AFTER_IMAGE)

        sequences, pieces = [], []
        for index, question in enumerate(questions):
            parts = [
                self._bos(),
                before,
                image_tokens[index : index + 1],
                after,
                prompts[index].to(weight.dtype),
                self.embed_text(question + ASSISTANT),
            ]
            sequences.append(torch.cat(parts))
            pieces.append([part.shape[0] for part in parts])
        return self._left_pad(sequences, pieces, soft_prompts=True)

    def build_findings_inputs(
        self, findings: list[str], questions: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, list[SequenceLayout]]:
        """Findings grounding: the detector's findings as text, with a worked example first."""
        sequences, pieces = [], []
        for finding, question in zip(findings, questions, strict=True):
            examples = "".join(
                f"### Human: Inspection: {found}. {DEFAULT_QUESTION}{ASSISTANT} {answer}\n"
                for found, answer in FINDINGS_EXAMPLES
            )
            text = f"{examples}### Human: {finding} {question}{ASSISTANT}"
            parts = [self._bos(), self.embed_text(text)]
            sequences.append(torch.cat(parts))
            pieces.append([part.shape[0] for part in parts])
        return self._left_pad(sequences, pieces, soft_prompts=False)

    def _left_pad(
        self, sequences: list[torch.Tensor], pieces: list[list[int]], soft_prompts: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[SequenceLayout]]:
        length = max(sequence.shape[0] for sequence in sequences)
        hidden = sequences[0].shape[1]
        weight = self.embeddings.weight
        inputs = weight.new_zeros(len(sequences), length, hidden)  # (B, T, hidden)
        mask = torch.zeros(len(sequences), length, dtype=torch.long, device=weight.device)

        layouts = []
        for index, (sequence, sizes) in enumerate(zip(sequences, pieces, strict=True)):
            pad = length - sequence.shape[0]
            inputs[index, pad:] = sequence
            mask[index, pad:] = 1
            if soft_prompts:
                image_position = pad + sizes[0] + sizes[1]
                prompt_start = image_position + sizes[2] + sizes[3]
                layouts.append(
                    SequenceLayout(image_position, prompt_start, prompt_start + sizes[4], length)
                )
            else:
                layouts.append(SequenceLayout(None, None, pad + sizes[0], length))
        return inputs, mask, layouts

    @torch.no_grad()
    def generate(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[tuple[str, int]]:
        """Greedy batched generation; each answer is cut at its first stop string."""
        from transformers import StoppingCriteriaList

        tokenizer = self.llm.tokenizer
        output = self.llm.model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([_StopStrings(tokenizer)]),
            pad_token_id=tokenizer.pad_token_id,
        )  # (B, new tokens): with inputs_embeds only, generate returns just the continuation

        answers = []
        for row in output:
            ids = [int(token) for token in row if int(token) != tokenizer.pad_token_id]
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            answers.append((_cut_at_stop(text), len(ids)))
        return answers

    def explain(
        self,
        image_embeddings: torch.Tensor,
        anomaly_maps: torch.Tensor,
        questions: list[str],
        findings: list[str] | None = None,
    ) -> list[Explanation]:
        """Answers for a batch of frames.

        Args:
            image_embeddings: (B, C_emb).
            anomaly_maps: (B, S, S).
            questions: B questions.
            findings: B findings sentences (`describe_findings`), needed in findings grounding.
        """
        if self.grounding is Grounding.FINDINGS:
            if findings is None:
                raise ValueError("findings grounding needs the detector's findings")
            inputs, mask, _ = self.build_findings_inputs(findings, questions)
        else:
            with torch.no_grad():
                inputs, mask, _ = self.build_inputs(image_embeddings, anomaly_maps, questions)
        return [
            Explanation(text, count, self.grounding) for text, count in self.generate(inputs, mask)
        ]


def describe_findings(anomalous: bool, regions: tuple[Region, ...]) -> str:
    """The detector's verdict as one line, in the form of `FINDINGS_EXAMPLES`."""
    if not anomalous:
        return "Inspection: GOOD, no defect."
    locations = list(dict.fromkeys(region.location for region in regions))
    where = join_words(locations) if locations else "an unknown place"
    if len(regions) == 1:
        return f"Inspection: DEFECTIVE, a defect at the {where}."
    return f"Inspection: DEFECTIVE, {len(regions)} defects at the {where}."


def agrees(answer: str, anomalous: bool) -> bool:
    """Whether an answer's yes/no matches the verdict (a small LLM sometimes copies an example)."""
    return answer.strip().lower().startswith("yes" if anomalous else "no")


def question_for(class_name: str | None, question: str = DEFAULT_QUESTION) -> str:
    """AnomalyGPT's question, prefixed with what the product is when we know it."""
    if not class_name:
        return question
    return f"This is a photo of a {class_name} for anomaly detection. {question}"


class _StopStrings:
    """Stops a sequence once its decoded answer holds a stop string.

    Note:
        transformers' own `stop_strings` needs a tokenizer whose vocabulary it can analyse, which
        not every local tokenizer allows; decoding the few new tokens each step works for any.
    """

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
    ) -> torch.Tensor:
        # Generating from inputs_embeds alone, input_ids holds only the new tokens.
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        done = [any(stop in text.lstrip() for stop in STOP_STRINGS) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str) -> str:
    text = text.lstrip()
    for stop in STOP_STRINGS:
        text = text.split(stop, 1)[0]
    return text.strip()
