"""SCST (`modeling_fsgr_pma.training.steps`): on-policy scoring, the REINFORCE gradient, beam sequences."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from conftest import EOS, fill_memory, tiny_model
from modeling_fsgr_pma.training import steps


class _Tokenizer:
    def batch_decode(self, sequences, skip_special_tokens=True):
        return [" ".join(str(t) for t in row.tolist() if t > EOS) for row in sequences]


def _reward(captions, image_ids):
    """A reward that prefers short captions, with ties broken by the tokens: enough to give non-zero advantages."""
    return [1.0 / (1 + len(c.split())) + 0.01 * (sum(map(int, c.split())) % 7) for c in captions]


@pytest.mark.parametrize("sequences", ["sample", "beam"])
def test_scored_log_probs_are_the_ones_generation_used_from_one_encoder_pass(sequences, monkeypatch):
    model = tiny_model(dropout=0.3, vocab_size=24)  # dropout and Gumbel noise would show an off-policy score
    fill_memory(model)
    # the captioning settings' processors would reshape a sampled policy without the scoring pass seeing it
    model.generation_config.update(no_repeat_ngram_size=1, repetition_penalty=2.0)
    model.train()
    generated, scored, encoder_calls = {}, {}, []
    original_generate, original_score = model.generate, steps.score_sequences

    def generate(**kwargs):
        out = original_generate(**kwargs, return_dict_in_generate=True, output_logits=True, output_scores=True)
        generated.update(out=out, training=model.training)
        return out.sequences

    def score(*args):
        scored["log_probs"] = original_score(*args)
        return scored["log_probs"]

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(steps, "score_sequences", score)
    model.model.encoder.register_forward_hook(lambda module, inputs, output: encoder_calls.append(1))
    batch = {"row": torch.arange(3), "pixel_values": torch.randn(3, 3, 32, 32)}
    torch.manual_seed(0)
    loss, _ = steps.scst_loss(model, model, batch, _Tokenizer(), ["a", "b", "c"], _reward, 4, 6, sequences)

    assert len(encoder_calls) == 1 and model.training  # one encoder pass for the 3 x 4 sequences; mode restored
    assert model.generation_config.no_repeat_ngram_size == 1  # the captioning settings restored
    out = generated["out"]
    assert not generated["training"] and out.sequences.shape[0] == 12
    mask = steps.caption_mask(out.sequences, model.config.eos_token_id)[:, 1:]
    if sequences == "sample":
        sampled_from = zip(out.scores, out.logits)  # the processed scores that were sampled, and the raw logits
        assert all(torch.equal(scores, logits) for scores, logits in sampled_from)
        step_log_probs = torch.stack([F.log_softmax(scores.float(), -1) for scores in out.scores], 1)  # (12, L-1, V)
        chosen = step_log_probs.gather(-1, out.sequences[:, 1:, None]).squeeze(-1)  # (12, L-1)
        expected = (chosen * mask).sum(1)
    else:  # beam scores are length-normalised sums of the same log-probabilities
        expected = out.sequences_scores * mask.sum(1)
        for beams in out.sequences.view(3, 4, -1):  # the 4 beams of an image are distinct
            assert len({tuple(row.tolist()) for row in beams}) == 4
    torch.testing.assert_close(scored["log_probs"].detach(), expected, atol=1e-4, rtol=0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.encoder.parameters())


def test_reinforce_gradient_matches_the_exact_expectation_on_a_toy_vocabulary():
    """A two-token autoregressive policy over 4 words: the mean of the estimator's gradient over many draws equals
    (1 - 1/S) ∇ E[r], computed exactly by enumerating the 16 sequences."""
    torch.manual_seed(0)
    vocab, num_sequences, draws = 4, 5, 40000
    theta = torch.randn(1 + vocab, vocab, requires_grad=True)  # row 0: first token; row 1 + w: after word w
    reward_table = torch.rand(vocab, vocab)

    def log_prob(first, second):
        second_log_probs = F.log_softmax(theta[1 + first], -1).gather(-1, second[:, None])[:, 0]
        return F.log_softmax(theta[0], -1)[first] + second_log_probs

    pairs = torch.tensor(list(itertools.product(range(vocab), repeat=2)))  # (16, 2)
    exact = (log_prob(pairs[:, 0], pairs[:, 1]).exp() * reward_table[pairs[:, 0], pairs[:, 1]]).sum()
    (exact_gradient,) = torch.autograd.grad(exact, theta)

    with torch.no_grad():
        first = torch.multinomial(F.softmax(theta[0], -1), draws * num_sequences, replacement=True)
        second = torch.multinomial(F.softmax(theta[1 + first], -1), 1)[:, 0]
    rewards = reward_table[first, second].view(draws, num_sequences)
    loss = steps.reinforce_loss(log_prob(first, second).view(draws, num_sequences), rewards)
    (estimate,) = torch.autograd.grad(-loss * num_sequences, theta)  # the mean over S sequences → their sum
    expected = (1 - 1 / num_sequences) * exact_gradient * num_sequences
    torch.testing.assert_close(estimate, expected, atol=0.02 * expected.abs().max().item(), rtol=0)
    assert torch.nn.functional.cosine_similarity(estimate.flatten(), expected.flatten(), 0) > 0.99


def test_unknown_sequence_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="beam"):
        steps.scst_generation_config(GenerationConfig(), "greedy", 5, 20)
