"""Training steps shared by `scripts/train.py` and `scripts/finetune_peft.py`.

Batching, the XE and SCST losses, synchronised prototype refresh, caption generation for evaluation, and
atomic, resumable checkpoints.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast, gather, pad_across_processes
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..modeling_fsgr_pma import FsgrPmaEncoderOutput, FsgrPmaForConditionalGeneration

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "training_state.json"


# ----------------------------------------------------------------------------------------------------------------
# Batching
@dataclass
class CaptionCollator:
    """Turns dataset rows into model inputs.

    Each image contributes its pair's caption (rows of [`CaptionPairs`]) or one of its reference captions, chosen by a
    generator seeded with (seed, epoch, row),
    so the choice never touches the global RNG: a resumed run sees exactly the captions of an uninterrupted one
    even though the data loader prefetches a batch ahead. With a feature cache, the frozen-prefix features and
    pseudo-labels replace the pixels.
    """

    processor: object
    max_length: int
    seed: int = 0
    epoch: int = 0
    features: dict[str, torch.Tensor] | None = None  # vision_hidden_states, patch_labels, indexed by row
    with_captions: bool = True

    def __call__(self, rows: list[dict]) -> dict:
        batch = {"row": torch.tensor([row["row"] for row in rows])}
        if self.features is not None:
            batch["vision_hidden_states"] = self.features["vision_hidden_states"][batch["row"]].float()
            batch["patch_labels"] = self.features["patch_labels"][batch["row"]]
        else:
            images = [row["image"] for row in rows]  # RGB PIL images
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        if self.with_captions:
            captions = [self.pick_caption(row) for row in rows]
            tokens = self.processor.tokenizer(
                captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        return batch

    def pick_caption(self, row: dict) -> str:
        if "caption_index" in row:  # an image-caption pair ([`CaptionPairs`])
            return row["captions"][row["caption_index"]]
        generator = np.random.default_rng([self.seed, self.epoch, row["row"]])
        return row["captions"][int(generator.integers(len(row["captions"])))]


def image_inputs_of(batch: dict) -> dict:
    """The image part of a batch: pixels, or cached frozen-prefix features (their pseudo-labels are not needed)."""
    return {k: batch[k] for k in ("pixel_values", "vision_hidden_states") if k in batch}


# ----------------------------------------------------------------------------------------------------------------
# Prototype memory across processes
class MemoryBankState:
    """Checkpointable view of every layer's bank (`accelerator.register_for_checkpointing`).

    Prototypes are buffers saved with the weights; the banks are training state and are saved here.
    """

    def __init__(self, model: FsgrPmaForConditionalGeneration):
        self.model = model

    def state_dict(self) -> dict:
        state = {}
        for i, layer in enumerate(self.model.memory_layers()):
            keys, values = layer.bank_contents()
            state[f"{i}.keys"], state[f"{i}.values"] = keys.cpu(), values.cpu()
            state[f"{i}.next"], state[f"{i}.filled"] = layer.bank_next, layer.bank_filled
        return state

    def load_state_dict(self, state: dict) -> None:
        for i, layer in enumerate(self.model.memory_layers()):
            device = layer.prototype_keys.device
            capacity = layer.config.memory_bank_size
            keys = torch.zeros(capacity, layer.config.hidden_size, dtype=state[f"{i}.keys"].dtype, device=device)
            values = torch.zeros_like(keys)
            filled = state[f"{i}.filled"]
            keys[:filled], values[:filled] = state[f"{i}.keys"].to(device), state[f"{i}.values"].to(device)
            layer.bank_keys, layer.bank_values = keys, values
            layer.bank_next, layer.bank_filled = state[f"{i}.next"], filled


def gather_rows(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a `(N_rank, d)` tensor over processes, where N differs between processes."""
    if accelerator.num_processes == 1:
        return tensor
    counts = gather(torch.tensor([len(tensor)], device=accelerator.device))  # (P,)
    padded = gather(pad_across_processes(tensor.to(accelerator.device), dim=0))  # (P * N_max, d)
    n_max = len(padded) // accelerator.num_processes
    return torch.cat([padded[i * n_max : i * n_max + int(n)] for i, n in enumerate(counts)])


@torch.no_grad()
def refresh_memory(accelerator: Accelerator, model: FsgrPmaForConditionalGeneration, seed: int, backend: str) -> None:
    """Refresh prototypes from the banks of all processes; every process ends with bitwise-equal prototypes.

    Every process gathers every bank; K-Means runs on the main process and its result is broadcast.
    """
    for layer in model.memory_layers():
        keys, values = layer.bank_contents()
        keys, values = gather_rows(accelerator, keys), gather_rows(accelerator, values)
        if accelerator.is_main_process:
            layer.refresh_prototypes(keys, values, seed=seed, backend=backend)
        if accelerator.num_processes > 1:
            for buffer in (layer.prototype_keys, layer.prototype_values, layer.prototype_ready):
                buffer.copy_(broadcast(buffer.clone(), from_process=0))


def bank_report(model: FsgrPmaForConditionalGeneration) -> str:
    layers = model.memory_layers()
    total = sum(layer.bank_nbytes() for layer in layers)
    filled = layers[0].bank_filled if layers else 0
    return f"{len(layers)} banks, {filled} entries each, {total / 2**20:.2f} MiB"


# ----------------------------------------------------------------------------------------------------------------
# Losses
def sequence_log_probs(logits: torch.Tensor, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token t+1 | ≤ t) over the unmasked targets: `(B, T, V)` logits → `(B,)`."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    chosen = log_probs.gather(-1, sequences[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (chosen * mask[:, 1:]).sum(1)


def caption_mask(sequences: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (generation pads finished rows).

    A padding id sampled before EOS is a token of the caption, not padding: masking it would score the sequence
    under another context than the one it was sampled in.
    """
    is_eos = (sequences == eos_token_id).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()  # 0 strictly after the first EOS


SCST_SEQUENCES = ("beam", "sample")


def scst_generation_config(
    model_config: GenerationConfig, sequences: str, num_sequences: int, max_new_tokens: int
) -> GenerationConfig:
    """The `generate` settings for the SCST sequences of one image: its `num_sequences` beams or samples.

    Beams are searched as the model captions (its `generation_config`, `no_repeat_ngram_size` included). Samples
    come from the model's own distribution: a fresh config keeps only the special token ids, so none of
    `generation_config`'s logits processors (no-repeat n-grams, repetition penalty, ...) and no top-k, top-p or
    temperature (transformers' default top-k of 50 among them) reshape the distribution that is sampled; the scoring
    pass, which sees raw logits, would not see such a change.
    """
    if sequences not in SCST_SEQUENCES:
        raise ValueError(f"SCST sequences must be one of {SCST_SEQUENCES}, got {sequences!r}")
    if sequences == "beam":
        config = copy.deepcopy(model_config)
        config.update(do_sample=False, num_beams=num_sequences, num_return_sequences=num_sequences,
                      max_new_tokens=max_new_tokens)
        return config
    token_ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return GenerationConfig(
        **{name: getattr(model_config, name) for name in token_ids}, do_sample=True, num_beams=1,
        num_return_sequences=num_sequences, max_new_tokens=max_new_tokens, top_k=0, top_p=1.0, temperature=1.0,
    )


def reinforce_loss(log_probs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Self-critical REINFORCE with the mean reward of the image's sequences as baseline (M² Transformer).

    Args:
        log_probs: `(B, S)` log-probability of each of an image's S sequences.
        rewards: `(B, S)` their rewards (no gradient).

    Returns `-mean((r - mean_S r) * log p)`. With sampled sequences its expected gradient is (1 - 1/S) times
    -∇ E[r]: the baseline includes the sequence itself, as in the M² code.
    """
    advantage = rewards - rewards.mean(1, keepdim=True)  # (B, S)
    return -(advantage.detach() * log_probs).mean()


def scst_loss(
    model,
    unwrapped: FsgrPmaForConditionalGeneration,
    batch: dict,
    tokenizer,
    image_ids: list[str],
    reward_fn,
    num_sequences: int,
    max_new_tokens: int,
    sequences: str = "beam",
) -> tuple[torch.Tensor, float]:
    """On-policy self-critical sequence training (Rennie et al. 2017), as the M² Transformer code runs it.

    The sequences of an image are its `num_sequences` beams (`sequences="beam"`, what FSGR's and PMA-Net's code
    do, after M²'s `train_scst`) or samples; each is rewarded with `reward_fn(captions, image_ids)` (CIDEr-D) and
    the baseline is the mean reward of the image's sequences ([`reinforce_loss`]).

    On-policy: the whole step runs in eval mode (no dropout, argmax concept assignment: one deterministic policy),
    the encoder runs once per image with gradient, the sequences are generated from its output, and one
    teacher-forced decoder pass over that same output scores them, so the log-probabilities that get the gradient
    are the ones generation used. M² runs its beam search in train mode with the search's own log-probabilities;
    transformers' `generate` keeps no graph, hence the separate scoring pass, and eval mode, so that both passes
    see the same policy.

    Returns the loss and the mean reward.
    """
    was_training, captioning_config = unwrapped.training, unwrapped.generation_config
    unwrapped.eval()
    # `generate` fills what a passed config leaves unset from the model's own, so the SCST settings stand in for it
    unwrapped.generation_config = scst_generation_config(captioning_config, sequences, num_sequences, max_new_tokens)
    try:
        encoder_outputs = unwrapped.get_encoder()(**image_inputs_of(batch))  # one pass per image, with gradient
        memory = encoder_outputs.last_hidden_state  # (B, n, d)
        with torch.no_grad():
            generated = unwrapped.generate(
                encoder_outputs=FsgrPmaEncoderOutput(last_hidden_state=memory.detach())
            )  # (B * S, L), the S sequences of an image adjacent
        captions = tokenizer.batch_decode(generated, skip_special_tokens=True)
        repeated_ids = [image_id for image_id in image_ids for _ in range(num_sequences)]
        rewards = torch.as_tensor(reward_fn(captions, repeated_ids), dtype=torch.float32, device=generated.device)
        log_probs = score_sequences(model, unwrapped.config, memory, generated, num_sequences)  # (B * S,)
    finally:
        unwrapped.train(was_training)
        unwrapped.generation_config = captioning_config
    rewards = rewards.view(-1, num_sequences)  # (B, S)
    return reinforce_loss(log_probs.view(-1, num_sequences), rewards), rewards.mean().item()


def score_sequences(
    model, config, memory: torch.Tensor, sequences: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Log-probability of each generated sequence under the decoder, over the encoder output it was generated from.

    Args:
        model: the (possibly DDP-wrapped) captioner.
        config: the model's config (its EOS id).
        memory: `(B, n, d)` encoder output, with gradient.
        sequences: `(B * S, L)` BOS-led sequences, the S of an image adjacent, padded after EOS.
        num_sequences: S.

    Returns `(B * S,)` sums of the token log-probabilities up to and including the first EOS.
    """
    mask = caption_mask(sequences, config.eos_token_id)  # (B * S, L)
    repeated = memory.repeat_interleave(num_sequences, 0)  # (B * S, n, d): an index, not S encoder passes
    logits = model(
        encoder_outputs=FsgrPmaEncoderOutput(last_hidden_state=repeated), input_ids=sequences, attention_mask=mask,
        use_cache=False,
    ).logits  # (B * S, L, V)
    return sequence_log_probs(logits, sequences, mask)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
@torch.no_grad()
def generate_captions(
    accelerator: Accelerator,
    model: FsgrPmaForConditionalGeneration,
    dataloader,
    tokenizer,
    image_ids: list[str],
    **generate_kwargs,
) -> dict[str, str]:
    """Caption every image of a prepared dataloader; returns {image_id: caption}, de-duplicated across processes."""
    was_training = model.training
    model.eval()
    captions: dict[str, str] = {}
    for batch in tqdm(dataloader, desc="captioning", disable=not accelerator.is_local_main_process, leave=False):
        encoder_outputs = model.get_encoder()(**image_inputs_of(batch))
        sequences = model.generate(encoder_outputs=encoder_outputs, **generate_kwargs)
        sequences = accelerator.pad_across_processes(sequences, dim=1, pad_index=model.config.pad_token_id)
        rows, sequences = accelerator.gather_for_metrics((batch["row"], sequences))
        for row, text in zip(rows.tolist(), tokenizer.batch_decode(sequences, skip_special_tokens=True)):
            captions[image_ids[row]] = text.strip()
    model.train(was_training)
    return captions


@torch.no_grad()
def reference_cross_entropy(
    accelerator: Accelerator,
    model: FsgrPmaForConditionalGeneration,
    dataloader,
    tokenizer,
    references: list[list[str]],
    max_length: int,
) -> float:
    """Teacher-forced cross-entropy, in nats per token, of every reference caption given its image.

    How well the model predicts the captions people wrote, independent of decoding: every reference of every image
    of a prepared dataloader (rows index `references`), tokens after BOS up to and including EOS, truncated to
    `max_length` tokens; pooled over all tokens and processes.
    """
    was_training = model.training
    model.eval()
    per_image = []  # (rows, loss sums, token counts) of each batch
    for batch in tqdm(dataloader, desc="reference loss", disable=not accelerator.is_local_main_process, leave=False):
        encoder_outputs = model.get_encoder()(**image_inputs_of(batch))
        rows = batch["row"].tolist()
        owners = torch.tensor([i for i, row in enumerate(rows) for _ in references[row]], device=batch["row"].device)
        texts = [caption for row in rows for caption in references[row]]
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(owners.device), tokens["attention_mask"].to(owners.device)
        memory = encoder_outputs.last_hidden_state.index_select(0, owners)  # (R, n_tokens, d)
        logits = model(encoder_outputs=type(encoder_outputs)(last_hidden_state=memory), input_ids=ids,
                       attention_mask=mask, use_cache=False).logits  # (R, T, V)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        losses = (losses.view(len(ids), -1) * mask[:, 1:]).sum(1)  # (R,)
        sums = torch.zeros(len(rows), device=owners.device).index_add_(0, owners, losses)  # (B,)
        counts = torch.zeros(len(rows), device=owners.device).index_add_(0, owners, mask[:, 1:].sum(1).float())
        per_image.append(accelerator.gather_for_metrics((sums, counts)))
    model.train(was_training)
    total = sum(float(sums.sum()) for sums, _ in per_image)
    tokens = sum(float(counts.sum()) for _, counts in per_image)
    return total / tokens


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict) -> Path:
    """`save_state` into `step_N.tmp`, then rename to `step_N`: a killed save never looks complete."""
    final = output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: Path, which: str) -> Path:
    """Resolve `--resume-from-checkpoint`: a directory, or `latest` (the newest complete `step_N`)."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pick another or use 'latest'")
        return path
    complete = []
    for path in sorted((output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")):
        if path.name.endswith(".tmp") or not (path / STATE_FILE).is_file():
            logger.warning("Skipping half-written checkpoint %s", path)
            continue
        complete.append(path)
    if not complete:
        raise ValueError(f"No complete checkpoint under {output_dir / 'checkpoints'} to resume from")
    return max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def load_checkpoint_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())
