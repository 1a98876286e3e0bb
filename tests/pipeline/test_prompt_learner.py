"""The prompt learner: 9 base prompts and 9 prompts from the map, sized to the LLM."""

from __future__ import annotations

import torch

from pipeline.prompt_learner import PromptLearner


def test_output_is_18_embeddings_of_the_llm_width() -> None:
    learner = PromptLearner(hidden_size=48).eval()
    prompts = learner(torch.rand(3, 224, 224))
    assert prompts.shape == (3, 18, 48)
    assert learner.num_prompts == 18


def test_base_prompts_are_shared_and_map_prompts_follow_the_map() -> None:
    torch.manual_seed(0)
    learner = PromptLearner(hidden_size=32).eval()
    maps = torch.zeros(2, 224, 224)
    maps[1, :50, :50] = 1.0  # a top left blob in the second map only
    with torch.no_grad():
        prompts = learner(maps)
    assert torch.equal(prompts[0, :9], prompts[1, :9])
    assert not torch.allclose(prompts[0, 9:], prompts[1, 9:])
    # The blob sits in the top left grid cell: that cell's prompt changes most.
    change = (prompts[1, 9:] - prompts[0, 9:]).norm(dim=-1)  # (9,) in row-major grid order
    assert int(change.argmax()) == 0


def test_other_map_sizes_are_resized_and_gradients_reach_every_part() -> None:
    learner = PromptLearner(hidden_size=16).train()
    prompts = learner(torch.rand(2, 336, 336))
    assert prompts.shape == (2, 18, 16)
    prompts.square().mean().backward()
    assert learner.base_prompts.grad is not None
    assert all(parameter.grad is not None for parameter in learner.map_encoder.parameters())
