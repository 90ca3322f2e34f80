"""Train FSGR-PMA: cross-entropy + SupCon with prototype memory, then SCST, under Accelerate.

Usage (the README demo's training step; any key of the YAML can be overridden on the command line):

    accelerate launch scripts/train.py --config configuration/train/synthetic.yaml \
        --data outputs/demo/data --clip-pretrained outputs/demo/clip.pt \
        --codebook outputs/demo/codebook.safetensors --output-dir outputs/demo/train

Two processes on a machine without a GPU (a gloo group; `--cpu` alone would start one process):
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...`. Resume a killed run exactly: add `--resume-from-checkpoint latest`.

Without `--tokenizer`, a BPE tokenizer is trained on the training captions into `OUTPUT_DIR/tokenizer` and reused on
resume; BPE training breaks ties randomly, so pass `--tokenizer` for two fresh runs to be bitwise comparable.

Stages: `--xe-steps` optimiser steps of XE + β·SupCon (prototypes refreshed every `memory_refresh_every` steps
after `--memory-warmup-steps`, faded in over `--memory-ramp-steps`), then `--scst-steps` of SCST with a CIDEr-D
reward and the prototypes frozen. An evaluation (and the save of a best model) at a refresh step runs before the
refresh, so a saved model holds the prototypes its decoder trained with. Every `--eval-every` steps the
model captions the evaluation split; the best CIDEr-D model is written with `save_pretrained` to
`OUTPUT_DIR/model` (weights with prototypes and codebook, processor, generation config, remote code).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, get_scheduler

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.training.clip_backbone import load_codebook, load_pretrained_clip
from modeling_fsgr_pma.data.captions import load_caption_split
from modeling_fsgr_pma.data.feature_cache import check_cache_matches, load_feature_cache
from modeling_fsgr_pma.evaluation.metrics import TokenizedCiderD
from modeling_fsgr_pma.processing_fsgr_pma import FsgrPmaProcessor
from modeling_fsgr_pma.training.throughput import ThroughputMeter
from modeling_fsgr_pma.data.tokenization import train_caption_tokenizer
from modeling_fsgr_pma.training.steps import (
    CaptionCollator,
    MemoryBankState,
    bank_report,
    find_checkpoint,
    generate_captions,
    load_checkpoint_state,
    refresh_memory,
    save_checkpoint,
    scst_loss,
)

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="YAML file whose keys are these arguments (dashes or underscores)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=str, help="dataset directory (synthetic/HF Parquet, Karpathy COCO, or folder)")
    data.add_argument("--image-root", type=str, default=None, help="image folder of the Karpathy COCO layout")
    data.add_argument("--train-split", default="train")
    data.add_argument("--eval-split", default="validation")
    data.add_argument("--eval-max-images", type=int, default=None, help="caption only the first N eval images")
    data.add_argument("--bad-images", choices=["skip", "error"], default="skip")
    data.add_argument("--feature-cache", type=Path, default=None, help="directory from scripts/extract_features.py")
    data.add_argument(
        "--max-caption-length", type=int, default=None,
        help="tokens, BOS and EOS included (default: the model's max_position_embeddings)",
    )
    data.add_argument("--augment", action="store_true", help="random resized crops (not with --feature-cache)")
    data.add_argument("--num-workers", type=int, default=0, help="data-loader processes decoding images")
    model = parser.add_argument_group("model")
    model.add_argument("--model-config", type=Path, default=Path("configuration/model/tiny.json"))
    model.add_argument("--clip-pretrained", type=str, default=None, help="open_clip tag (e.g. openai) or checkpoint")
    model.add_argument("--codebook", type=Path, default=None, help="safetensors from scripts/build_codebook.py")
    model.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory; default: train one")
    model.add_argument("--vocab-size", type=int, default=10000, help="BPE size when training the tokenizer")
    model.add_argument("--no-memory", action="store_true", help="ablation: decoder without prototype memory")
    model.add_argument("--no-fsgr", action="store_true", help="ablation: plain CLIP patches, no quantisation")
    model.add_argument("--no-supcon", action="store_true", help="ablation: no local contrastive loss")
    model.add_argument("--num-prototypes", type=int, default=None, help="override the config's m")
    model.add_argument(
        "--config-overrides", default=None,
        help="model config fields to override, e.g. 'memory_window=50,memory_prior=true' "
        "(PretrainedConfig.update_from_string; applied last)",
    )
    model.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)"
    )
    train = parser.add_argument_group("optimisation")
    train.add_argument("--output-dir", type=Path, required=False)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=32, help="per process")
    train.add_argument("--eval-batch-size", type=int, default=64)
    train.add_argument("--gradient-accumulation-steps", type=int, default=1)
    train.add_argument("--learning-rate", type=float, default=5e-4)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-steps", type=int, default=50)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--xe-steps", type=int, default=500)
    train.add_argument("--memory-warmup-steps", type=int, default=100, help="XE steps before the first refresh")
    train.add_argument(
        "--memory-ramp-steps", type=int, default=0,
        help="fade the memory in over this many steps after the first refresh (0: switch it on at once)",
    )
    train.add_argument("--kmeans-backend", choices=["auto", "faiss", "torch"], default="auto")
    train.add_argument("--scst-steps", type=int, default=0)
    train.add_argument("--scst-learning-rate", type=float, default=5e-5)
    train.add_argument("--scst-samples", type=int, default=5)
    train.add_argument("--eval-every", type=int, default=250)
    train.add_argument("--checkpoint-every", type=int, default=250)
    train.add_argument("--resume-from-checkpoint", type=str, default=None, help="a step_N directory or 'latest'")
    train.add_argument("--num-beams", type=int, default=3)
    train.add_argument("--max-new-tokens", type=int, default=20)
    train.add_argument("--no-repeat-ngram-size", type=int, default=4,
                       help="generation_config.json: never say the same N tokens twice (0: off; docs/results.md)")
    train.add_argument("--report-to", default="tensorboard", help="Accelerate tracker, or 'none'")

    args = parser.parse_args(argv)
    if args.config is not None:
        defaults = _read_config(args.config, parser)
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    for name in ("data", "output_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
    if args.memory_ramp_steps < 0:
        parser.error("--memory-ramp-steps must be non-negative")
    if args.xe_steps + args.scst_steps <= 0:
        parser.error("nothing to do: --xe-steps and --scst-steps are both 0")
    if args.scst_steps and args.scst_samples < 2:
        parser.error("--scst-samples must be at least 2 (the baseline is the mean of the other samples)")
    if args.feature_cache is not None and not args.feature_cache.is_dir():
        parser.error(f"--feature-cache {args.feature_cache} is not a directory")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 (decode in the training process) or more")
    if args.feature_cache is not None and args.augment:
        parser.error("--augment cannot be used with --feature-cache: the cache holds one fixed view of each image")
    return args


def _read_config(path: Path, parser: argparse.ArgumentParser) -> dict:
    if not path.is_file():
        parser.error(f"--config {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known or dest == "config":
            parser.error(f"{path}: unknown key '{key}' (valid keys are the script's --arguments)")
        defaults[dest] = value  # argparse applies each argument's type to string defaults
    return defaults


def prepare_tokenizer(accelerator: Accelerator, args: argparse.Namespace, train_data) -> PreTrainedTokenizerFast:
    """`--tokenizer`, else one trained once per run into `OUTPUT_DIR/tokenizer` and loaded by every process.

    BPE training breaks ties in a random order, so a tokenizer trained again (on another rank, or on resume)
    could differ: the saved one is reused whenever it exists.
    """
    if args.tokenizer is not None:
        return PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
    directory = args.output_dir / "tokenizer"
    if accelerator.is_main_process and not (directory / "tokenizer.json").is_file():
        captions = (caption for captions in train_data["captions"] for caption in captions)
        train_caption_tokenizer(captions, args.vocab_size).save_pretrained(directory)
    accelerator.wait_for_everyone()
    return PreTrainedTokenizerFast.from_pretrained(directory)


def build_config(args: argparse.Namespace, vocab_size: int, concept_names: list[str] | None) -> FsgrPmaConfig:
    config = FsgrPmaConfig.from_json_file(args.model_config)
    overrides = {"vocab_size": vocab_size}
    if concept_names is not None:
        overrides.update(
            num_concepts=len(concept_names),
            concept_names=concept_names,
            concept_top_k=min(config.concept_top_k, len(concept_names)),
        )
    if args.no_memory:
        overrides["use_memory"] = False
    if args.no_fsgr:
        overrides["use_fsgr"] = False
    if args.no_supcon:
        overrides["supcon_weight"] = 0.0
    if args.num_prototypes is not None:
        overrides["num_prototypes"] = args.num_prototypes
    if args.clip_pretrained is not None:
        overrides["clip_pretrained"] = args.clip_pretrained
    config = FsgrPmaConfig(**{**config.to_dict(), **overrides})
    if args.config_overrides:
        config.update_from_string(args.config_overrides)  # raises ValueError for an unknown field or a bad value
        config = FsgrPmaConfig(**config.to_dict())  # validated again
    return config


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Stage-dependent unused parameters: memory segments before the first refresh, the SupCon head in SCST.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(args.seed)
    logger.info(accelerator.state, main_process_only=False)

    # Data (validated and indexed once by the main process; the others read its cache)
    with accelerator.main_process_first():
        train_data = load_caption_split(args.data, args.train_split, args.image_root, args.bad_images)
        eval_data = load_caption_split(args.data, args.eval_split, args.image_root, args.bad_images)
    if args.eval_max_images is not None:
        eval_data = eval_data.select(range(min(args.eval_max_images, len(eval_data))))
    train_data = train_data.add_column("row", list(range(len(train_data))))
    eval_data = eval_data.add_column("row", list(range(len(eval_data))))
    logger.info(f"{len(train_data)} training images, {len(eval_data)} evaluation images")

    # Tokenizer, config, model
    tokenizer = prepare_tokenizer(accelerator, args, train_data)
    codebook, concept_names = load_codebook(args.codebook) if args.codebook is not None else (None, None)
    config = build_config(args, len(tokenizer), concept_names)
    model = FsgrPmaForConditionalGeneration(config)
    if args.clip_pretrained is not None:
        clip = load_pretrained_clip(config.clip_config, config.clip_model_name, args.clip_pretrained)
        model.load_clip_vision_weights(clip.visual.state_dict())
    if codebook is not None:
        model.set_codebook(codebook, concept_names)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    processor = FsgrPmaProcessor.for_config(config, tokenizer)
    max_caption_length = args.max_caption_length or config.max_position_embeddings
    if max_caption_length > config.max_position_embeddings:
        raise ValueError(
            f"--max-caption-length {max_caption_length} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})"
        )
    logger.info(
        f"{model.num_parameters_trainable():,} trainable of {model.num_parameters():,} parameters; "
        f"memory {'on' if config.use_memory else 'off'}, FSGR {'on' if config.use_fsgr else 'off'}"
    )

    # Batches: cached frozen-prefix features replace the pixels when given
    train_features = eval_features = None
    if args.feature_cache is not None:
        check_cache_matches(args.feature_cache, config, codebook)
        # Shards indexed by dataset row: a batch reads its own rows from disk (the page cache), nothing more.
        train_features = load_feature_cache(args.feature_cache, args.train_split).aligned(list(train_data["image_id"]))
        eval_features = load_feature_cache(args.feature_cache, args.eval_split).aligned(list(eval_data["image_id"]))
        # The cache replaces the pixels: without the image column, reading a row no longer decodes its image.
        train_data, eval_data = train_data.remove_columns("image"), eval_data.remove_columns("image")
    collator = CaptionCollator(
        processor, max_caption_length, seed=args.seed, features=train_features, augment=args.augment
    )
    eval_collator = CaptionCollator(processor, max_caption_length, features=eval_features, with_captions=False)
    # Loaders own their generators: creating an iterator (which a resumed run does mid-epoch) would otherwise
    # draw from the global RNG and shift dropout and Gumbel noise away from the uninterrupted run.
    # Workers are not persistent: each epoch's iterator copies the collator with its new `epoch`.
    train_loader = DataLoader(
        train_data, batch_size=args.batch_size, shuffle=True, collate_fn=collator, drop_last=True,
        generator=torch.Generator().manual_seed(args.seed), num_workers=args.num_workers,
    )
    eval_loader = DataLoader(
        eval_data, batch_size=args.eval_batch_size, collate_fn=eval_collator,
        generator=torch.Generator().manual_seed(args.seed), num_workers=args.num_workers,
    )

    # Optimisation
    optimizer = torch.optim.AdamW(model.param_groups(args.weight_decay), lr=args.learning_rate)
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=max(args.xe_steps, 1) * accelerator.num_processes,
    )
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    unwrapped = accelerator.unwrap_model(model)
    accelerator.register_for_checkpointing(MemoryBankState(unwrapped))
    if accelerator.is_main_process:
        accelerator.init_trackers("fsgr_pma", config={k: str(v) for k, v in vars(args).items()})

    train_ids, eval_ids = list(train_data["image_id"]), list(eval_data["image_id"])
    reward = TokenizedCiderD(dict(zip(train_ids, list(train_data["captions"]))))
    eval_cider = TokenizedCiderD(dict(zip(eval_ids, list(eval_data["captions"]))))

    # Resume
    global_step, best_cider, history = 0, -1.0, []
    if args.resume_from_checkpoint is not None:
        checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        accelerator.load_state(str(checkpoint))
        state = load_checkpoint_state(checkpoint)
        global_step, best_cider, history = state["global_step"], state["best_cider"], state["history"]
        logger.info(f"Resumed from {checkpoint} at step {global_step}")

    total_steps = args.xe_steps + args.scst_steps
    steps_per_epoch = len(train_loader) // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"The training split has {len(train_data)} images: fewer than one batch of "
            f"{args.batch_size} x {args.gradient_accumulation_steps} per process"
        )
    progress = tqdm(
        total=total_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process
    )
    model.train()
    meter = ThroughputMeter(accelerator)
    images = tokens = 0  # this process's, since the last optimiser step
    while global_step < total_steps:
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        train_loader.set_epoch(epoch)
        collator.epoch = epoch
        batches = accelerator.skip_first_batches(
            train_loader, step_in_epoch * args.gradient_accumulation_steps
        ) if step_in_epoch else train_loader
        for batch in batches:
            scst = global_step >= args.xe_steps
            if unwrapped.config.use_memory:
                unwrapped.set_memory_ramp(_memory_ramp(global_step, args))
            images += len(batch["row"])
            tokens += int(batch["attention_mask"][:, 1:].sum())  # targets: every token after BOS
            with accelerator.accumulate(model):
                if scst:
                    for group in optimizer.param_groups:
                        group["lr"] = args.scst_learning_rate
                    image_ids = [train_ids[int(row)] for row in batch["row"]]
                    loss, mean_reward = scst_loss(
                        model, unwrapped, batch, tokenizer, image_ids, reward.score, args.scst_samples,
                        args.max_new_tokens,
                    )
                    logs = {"scst_loss": loss.item(), "reward": mean_reward}
                else:
                    inputs = {k: v for k, v in batch.items() if k != "row"}
                    out = model(**inputs, labels=batch["input_ids"])
                    loss = out.loss
                    logs = {"loss": loss.item(), "xe_loss": out.xe_loss.item()}
                    if out.supcon_loss is not None:
                        logs["supcon_loss"] = out.supcon_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if not scst:
                    scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            logs["lr"] = optimizer.param_groups[0]["lr"]
            logs.update(meter.step(images, None if scst else tokens))
            images = tokens = 0

            if global_step % args.eval_every == 0 or global_step == total_steps:
                if unwrapped.config.use_memory:
                    unwrapped.set_memory_ramp(1.0)  # evaluate (and save) the model as it is released
                captions = generate_captions(
                    accelerator, unwrapped, eval_loader, tokenizer, eval_ids,
                    num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                )
                cider = float(eval_cider.score(list(captions.values()), list(captions)).mean())
                logs["eval_cider"] = cider
                history.append({"step": global_step, "cider": cider})
                logger.info(f"step {global_step}: CIDEr-D {cider:.3f} on {len(captions)} {args.eval_split} images")
                if cider > best_cider:
                    best_cider = cider
                    save_release(accelerator, unwrapped, processor, args.output_dir / "model")
            if unwrapped.config.use_memory and _is_refresh_step(global_step, args, unwrapped.config):
                refresh_memory(accelerator, unwrapped, seed=args.seed + global_step, backend=args.kmeans_backend)
                logger.info(f"step {global_step}: prototypes refreshed ({bank_report(unwrapped)})")
            accelerator.log(logs, step=global_step)
            progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
            if global_step % args.checkpoint_every == 0 or global_step == total_steps:
                state = {"global_step": global_step, "best_cider": best_cider, "history": history}
                save_checkpoint(accelerator, args.output_dir, global_step, state)
            if global_step >= total_steps:
                break
            meter.restart()
    progress.close()
    accelerator.end_training()
    summary = {"best_cider": best_cider, "history": history, "steps": global_step}
    if accelerator.is_main_process:
        (args.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _is_refresh_step(step: int, args: argparse.Namespace, config: FsgrPmaConfig) -> bool:
    """Refresh at the end of the memory warm-up and every `memory_refresh_every` steps after it, during XE only.

    The last XE step never refreshes: SCST and the release keep the prototypes the decoder last trained with.
    """
    after_warmup = step - args.memory_warmup_steps
    return 0 <= after_warmup and after_warmup % config.memory_refresh_every == 0 and step < args.xe_steps


def _memory_ramp(completed_steps: int, args: argparse.Namespace) -> float:
    """The memory's weight in the next step: 1/N right after the first refresh, rising linearly to 1 over N steps."""
    if args.memory_ramp_steps == 0:
        return 1.0
    return min(1.0, max(1, completed_steps - args.memory_warmup_steps + 1) / args.memory_ramp_steps)


def save_release(accelerator: Accelerator, model: FsgrPmaForConditionalGeneration, processor, directory: Path) -> None:
    """Write a loadable release (LoRA merged into plain tower weights, processor, generation config, code)."""
    if not accelerator.is_main_process:
        return
    release = copy.deepcopy(model)
    release.merge_encoder_lora()
    release.save_pretrained(directory)
    processor.save_pretrained(directory)
    logger.info(f"Saved the model to {directory}")


if __name__ == "__main__":
    main()
