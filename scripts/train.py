"""Train FSGR-PMA: cross-entropy + SupCon with prototype memory, then SCST, under Accelerate.

Usage (the README demo's training step; any key of the YAML can be overridden on the command line, any field of the
model config with `--config-overrides`):

    accelerate launch scripts/train.py --config configuration/train/synthetic.yaml \
        --data outputs/demo/data --clip-pretrained outputs/demo/clip.safetensors \
        --codebook outputs/demo/codebook.safetensors --output-dir outputs/demo/train

Two processes on a machine without a GPU (a gloo group; `--cpu` alone would start one process):
`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...`. Resume a killed run exactly: add `--resume-from-checkpoint latest`.

Without `--tokenizer`, a BPE tokenizer is trained on the training captions into `OUTPUT_DIR/tokenizer` and reused on
resume; BPE training breaks ties randomly, so pass `--tokenizer` for two fresh runs to be bitwise comparable.

Stages: `--xe-steps` optimiser steps of XE + β·SupCon, each epoch over the images (one random reference caption each)
or, with `--xe-epoch pairs`, over every image-caption pair as the papers' data loader; the prototypes are refreshed
every `memory_refresh_every` steps after `memory_warmup_steps` and faded in over `memory_ramp_steps` (the memory's
schedule is the model config's, changed like any model field with `--config-overrides`). Then at most `--scst-steps`
of on-policy SCST with a CIDEr-D reward on each image's beams (or samples, `--scst-sequences`), the prototypes frozen,
stopped early after `--scst-patience` evaluations without a better CIDEr-D. An evaluation (and the save of a best
model) at a refresh step runs before the refresh, so a saved model holds the prototypes its decoder trained with.
Every `--eval-every` steps the model captions the evaluation split; the best CIDEr-D model is written with
`save_pretrained` to `OUTPUT_DIR/model` (weights with prototypes and codebook, processor, generation config, remote
code). `--print-schedule` prints the plan (steps, epochs in the papers' units, rates, images and captions seen) as
JSON without loading data or model (docs/coco-recipe.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, get_scheduler

from modeling_fsgr_pma import FsgrPmaConfig, FsgrPmaForConditionalGeneration
from modeling_fsgr_pma.training.clip_backbone import load_codebook, load_pretrained_clip, with_concepts
from modeling_fsgr_pma.data.captions import CaptionPairs, load_caption_split
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
    data.add_argument("--feature-cache", type=Path, default=None, help="directory from scripts/extract_features.py")
    data.add_argument(
        "--max-caption-length", type=int, default=None,
        help="tokens, BOS and EOS included (default: the model's max_position_embeddings)",
    )
    data.add_argument("--num-workers", type=int, default=0, help="data-loader processes decoding images")
    model = parser.add_argument_group("model")
    model.add_argument("--model-config", type=Path, default=Path("configuration/model/tiny.json"))
    model.add_argument("--clip-pretrained", type=str, default=None, help="open_clip tag (e.g. openai) or checkpoint")
    model.add_argument("--codebook", type=Path, default=None, help="safetensors from scripts/build_codebook.py")
    model.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory; default: train one")
    model.add_argument("--vocab-size", type=int, default=10000, help="BPE size when training the tokenizer")
    model.add_argument(
        "--config-overrides", default=None,
        help="model config fields to override, e.g. 'use_memory=false', 'memory_warmup_steps=50,memory_prior=true' "
        "(PretrainedConfig.update_from_string; applied last): the one way to change the model, ablations included",
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
    train.add_argument(
        "--backbone-lr-scale", type=float, default=1.0,
        help="the vision tower's adapters (LoRA, prompts) train at this multiple of the learning rate (FSGR: 0.1)",
    )
    train.add_argument(
        "--lr-schedule", choices=["cosine", "fsgr"], default="cosine",
        help="cosine: linear warm-up over --warmup-steps, cosine decay over the XE steps; fsgr: FSGR's per-epoch "
        "factors (0.25, 0.5, 0.75 in epochs 1-3, 1 in 4-6, 0.2 in 7-12, 0.04 after; --warmup-steps unused)",
    )
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--warmup-steps", type=int, default=50)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--xe-steps", type=int, default=500)
    train.add_argument(
        "--xe-epoch", choices=["images", "pairs"], default="images",
        help="what an XE epoch passes over: every image once with a random reference caption, or every "
        "image-caption pair once (the M² data loader's epoch, FSGR's and PMA-Net's)",
    )
    train.add_argument("--kmeans-backend", choices=["auto", "faiss", "torch"], default="auto")
    train.add_argument("--scst-steps", type=int, default=0, help="SCST steps at most (the cap with --scst-patience)")
    train.add_argument("--scst-learning-rate", type=float, default=5e-5)
    train.add_argument(
        "--scst-sequences", choices=["beam", "sample"], default="beam",
        help="an image's SCST sequences: its beams (M², FSGR, PMA-Net) or samples; the baseline is their mean reward",
    )
    train.add_argument("--scst-num-sequences", type=int, default=5, help="beams (or samples) per image (papers: 5)")
    train.add_argument(
        "--scst-patience", type=int, default=0,
        help="stop SCST after this many evaluations without a better CIDEr-D (FSGR: 5 epochs); 0: run every step",
    )
    train.add_argument("--eval-every", type=int, default=250)
    train.add_argument("--checkpoint-every", type=int, default=250)
    train.add_argument("--resume-from-checkpoint", type=str, default=None, help="a step_N directory or 'latest'")
    train.add_argument("--num-beams", type=int, default=3)
    train.add_argument("--max-new-tokens", type=int, default=20)
    train.add_argument("--no-repeat-ngram-size", type=int, default=4,
                       help="generation_config.json: never say the same N tokens twice (0: off; docs/results.md)")
    train.add_argument("--report-to", default="tensorboard", help="Accelerate tracker, or 'none'")
    plan = parser.add_argument_group("plan (--print-schedule)")
    plan.add_argument(
        "--print-schedule", action="store_true",
        help="print the schedule as one JSON object and exit, loading neither data nor model",
    )
    plan.add_argument(
        "--accelerate-config", type=Path, default=None,
        help="accelerate config file whose num_processes the schedule assumes (default: this launch's processes)",
    )
    plan.add_argument("--expected-train-images", type=int, default=None, help="training images the recipe assumes")
    plan.add_argument("--expected-train-pairs", type=int, default=None, help="image-caption pairs it assumes")

    args = parser.parse_args(argv)
    if args.config is not None:
        defaults = _read_config(args.config, parser)
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    if args.print_schedule:
        return args
    for name in ("data", "output_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
    if args.xe_steps + args.scst_steps <= 0:
        parser.error("nothing to do: --xe-steps and --scst-steps are both 0")
    if args.scst_steps and args.scst_num_sequences < 2:
        parser.error("--scst-num-sequences must be at least 2 (the baseline is the mean of the image's sequences)")
    if not 0 < args.backbone_lr_scale <= 1:
        parser.error("--backbone-lr-scale must lie in (0, 1]")
    if args.feature_cache is not None and not args.feature_cache.is_dir():
        parser.error(f"--feature-cache {args.feature_cache} is not a directory")
    if args.num_workers < 0:
        parser.error("--num-workers must be 0 (decode in the training process) or more")
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
    if args.config_overrides:
        config.update_from_string(args.config_overrides)  # raises ValueError for an unknown field or a bad value
    overrides = {"vocab_size": vocab_size}
    if concept_names is not None:
        overrides.update(with_concepts(config, concept_names))  # ValueError unless it has num_concepts names
    if args.clip_pretrained is not None:
        overrides["clip_pretrained"] = args.clip_pretrained
    return FsgrPmaConfig(**{**config.to_dict(), **overrides})  # validated


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.print_schedule:
        schedule = plan_schedule(args)
        print(json.dumps(schedule, indent=2))  # the script's output, not a log line
        return schedule
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
        train_data = load_caption_split(args.data, args.train_split, args.image_root)
        eval_data = load_caption_split(args.data, args.eval_split, args.image_root)
    if args.eval_max_images is not None:
        eval_data = eval_data.select(range(min(args.eval_max_images, len(eval_data))))
    train_data = train_data.add_column("row", list(range(len(train_data))))
    eval_data = eval_data.add_column("row", list(range(len(eval_data))))
    logger.info(
        f"{len(train_data)} training images ({sum(map(len, train_data['captions']))} image-caption pairs), "
        f"{len(eval_data)} evaluation images"
    )

    # Tokenizer, config, model
    tokenizer = prepare_tokenizer(accelerator, args, train_data)
    codebook, concept_names = load_codebook(args.codebook) if args.codebook is not None else (None, None)
    config = build_config(args, len(tokenizer), concept_names)
    clip = None
    if args.clip_pretrained is not None:
        clip = load_pretrained_clip(config.clip_config, config.clip_model_name, args.clip_pretrained)
        config.concept_logit_scale = float(clip.logit_scale.detach().exp())  # the checkpoint's own, as FSGR's code uses
    model = FsgrPmaForConditionalGeneration(config)
    if clip is not None:
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
    collator = CaptionCollator(processor, max_caption_length, seed=args.seed, features=train_features)
    # XE over image-caption pairs or over images; SCST always over images (its sequences are generated per image).
    xe_data = CaptionPairs(train_data) if args.xe_epoch == "pairs" else train_data
    eval_collator = CaptionCollator(processor, max_caption_length, features=eval_features, with_captions=False)
    # Loaders own their generators: creating an iterator (which a resumed run does mid-epoch) would otherwise
    # draw from the global RNG and shift dropout and Gumbel noise away from the uninterrupted run.
    # Workers are not persistent: each epoch's iterator copies the collator with its new `epoch`.
    xe_loader, scst_loader = (
        DataLoader(
            data, batch_size=args.batch_size, shuffle=True, collate_fn=collator, drop_last=True,
            generator=torch.Generator().manual_seed(args.seed), num_workers=args.num_workers,
        )
        for data in (xe_data, train_data)
    )
    eval_loader = DataLoader(
        eval_data, batch_size=args.eval_batch_size, collate_fn=eval_collator,
        generator=torch.Generator().manual_seed(args.seed), num_workers=args.num_workers,
    )

    # Optimisation (fused AdamW: one kernel for all tensors, on CPU about 10x the default per-tensor loop)
    backbone_lr = args.learning_rate * args.backbone_lr_scale
    optimizer = torch.optim.AdamW(model.param_groups(args.weight_decay, args.learning_rate, backbone_lr), fused=True)
    model, optimizer, xe_loader, scst_loader, eval_loader = accelerator.prepare(
        model, optimizer, xe_loader, scst_loader, eval_loader
    )
    steps_per_epoch = {  # optimiser steps per epoch of each stage, per process (the loaders are sharded)
        "xe": len(xe_loader) // args.gradient_accumulation_steps,
        "scst": len(scst_loader) // args.gradient_accumulation_steps,
    }
    if min(steps_per_epoch.values()) == 0:
        raise ValueError(
            f"The training split has {len(train_data)} images: fewer than one batch of "
            f"{args.batch_size} x {args.gradient_accumulation_steps} per process"
        )
    # The prepared scheduler steps once per process at every optimiser step: counts are in steps x processes.
    if args.lr_schedule == "fsgr":
        epoch_steps = steps_per_epoch["xe"] * accelerator.num_processes
        scheduler = LambdaLR(optimizer, lambda step: fsgr_lr_factor(step // epoch_steps))
    else:
        scheduler = get_scheduler(
            "cosine",
            optimizer,
            num_warmup_steps=args.warmup_steps * accelerator.num_processes,
            num_training_steps=max(args.xe_steps, 1) * accelerator.num_processes,
        )
    scheduler = accelerator.prepare(scheduler)
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
    progress = tqdm(
        total=total_steps, initial=global_step, desc="training", disable=not accelerator.is_local_main_process
    )
    model.train()
    meter = ThroughputMeter(accelerator)
    images = tokens = 0  # this process's, since the last optimiser step
    stop = False
    while global_step < total_steps and not stop:
        stage = "scst" if global_step >= args.xe_steps else "xe"
        loader = scst_loader if stage == "scst" else xe_loader
        epoch, step_in_epoch = divmod(global_step - (args.xe_steps if stage == "scst" else 0), steps_per_epoch[stage])
        loader.set_epoch(epoch)
        collator.epoch = epoch
        batches = accelerator.skip_first_batches(
            loader, step_in_epoch * args.gradient_accumulation_steps
        ) if step_in_epoch else loader
        for batch in batches:
            scst = stage == "scst"
            if unwrapped.config.use_memory:
                unwrapped.set_memory_ramp(_memory_ramp(global_step, unwrapped.config))
            images += len(batch["row"])
            tokens += int(batch["attention_mask"][:, 1:].sum())  # targets: every token after BOS
            with accelerator.accumulate(model):
                if scst:
                    for group in optimizer.param_groups:
                        group["lr"] = args.scst_learning_rate
                    image_ids = [train_ids[int(row)] for row in batch["row"]]
                    loss, mean_reward = scst_loss(
                        model, unwrapped, batch, tokenizer, image_ids, reward.score, args.scst_num_sequences,
                        args.max_new_tokens, args.scst_sequences,
                    )
                    logs = {"scst_loss": loss.item(), "reward": mean_reward}
                else:
                    inputs = {k: v for k, v in batch.items() if k not in ("row", "caption_index")}
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
                stop = scst and _patience_exhausted(history, args)
            if unwrapped.config.use_memory and _is_refresh_step(global_step, args, unwrapped.config):
                refresh_memory(accelerator, unwrapped, seed=args.seed + global_step, backend=args.kmeans_backend)
                logger.info(f"step {global_step}: prototypes refreshed ({bank_report(unwrapped)})")
            accelerator.log(logs, step=global_step)
            progress.set_postfix({k: f"{v:.3g}" for k, v in logs.items()})
            if global_step % args.checkpoint_every == 0 or global_step == total_steps or stop:
                state = {"global_step": global_step, "best_cider": best_cider, "history": history}
                save_checkpoint(accelerator, args.output_dir, global_step, state)
            if global_step >= total_steps or stop or (not scst and global_step == args.xe_steps):
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
    after_warmup = step - config.memory_warmup_steps
    return 0 <= after_warmup and after_warmup % config.memory_refresh_every == 0 and step < args.xe_steps


def _memory_ramp(completed_steps: int, config: FsgrPmaConfig) -> float:
    """The memory's weight in the next step: 1/N right after the first refresh, rising linearly to 1 over N steps."""
    if config.memory_ramp_steps == 0:
        return 1.0
    return min(1.0, max(1, completed_steps - config.memory_warmup_steps + 1) / config.memory_ramp_steps)


def _patience_exhausted(history: list[dict], args: argparse.Namespace) -> bool:
    """SCST stops once its last `--scst-patience` evaluations all fell short of the best before them (FSGR's rule,
    counted in evaluations: train_transformer.py's `patience == 5` over epochs)."""
    scst = [entry["cider"] for entry in history if entry["step"] > args.xe_steps]
    if args.scst_patience == 0 or len(scst) <= args.scst_patience:
        return False
    best_before = max(entry["cider"] for entry in history[: len(history) - args.scst_patience])
    return all(cider < best_before for cider in scst[-args.scst_patience :])


def fsgr_lr_factor(epoch: int) -> float:
    """FSGR's XE learning-rate factor in (0-based) `epoch`: warm-up over 3 epochs, then steps down (`lr_lambda` of
    FSGR's train_transformer.py)."""
    if epoch < 3:
        return (epoch + 1) / 4
    return 1.0 if epoch < 6 else 0.2 if epoch < 12 else 0.04


def plan_schedule(args: argparse.Namespace) -> dict:
    """The run's plan in the papers' units, from the arguments alone (no data, no model).

    Processes come from `--accelerate-config` (its `num_processes`), else from this launch. Epoch counts need the
    split's size: `--expected-train-images` and `--expected-train-pairs` (the recipe's), else they are null.
    """
    if args.accelerate_config is not None:
        processes = int(yaml.safe_load(args.accelerate_config.read_text()).get("num_processes", 1))
    else:
        processes = int(os.environ.get("WORLD_SIZE", 1))
    config = FsgrPmaConfig.from_json_file(args.model_config)
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    global_batch = args.batch_size * args.gradient_accumulation_steps * processes
    images, pairs = args.expected_train_images, args.expected_train_pairs
    xe_unit = pairs if args.xe_epoch == "pairs" else images
    xe_steps_per_epoch = xe_unit // global_batch if xe_unit else None
    scst_steps_per_epoch = images // global_batch if images else None
    xe_images = args.xe_steps * global_batch
    xe_captions = xe_images  # one caption per image in a step, whichever the epoch
    scst_images = args.scst_steps * global_batch

    def per(total: int, unit: int | None) -> float | None:
        return round(total / unit, 3) if unit else None

    if args.lr_schedule == "fsgr":  # FSGR's warm-up is its first 3 epochs
        warmup = 3 * xe_steps_per_epoch if xe_steps_per_epoch else None
    else:
        warmup = args.warmup_steps
    return {
        "num_processes": processes,
        "per_process_batch_size": args.batch_size,
        "global_batch_size": global_batch,
        "xe_epoch": args.xe_epoch,
        "xe_steps": args.xe_steps,
        "xe_steps_per_epoch": xe_steps_per_epoch,
        "xe_pair_epochs": per(xe_captions, pairs),
        "xe_image_epochs": per(xe_images, images),
        "learning_rate": args.learning_rate,
        "backbone_learning_rate": args.learning_rate * args.backbone_lr_scale,
        "lr_schedule": args.lr_schedule,
        "warmup_steps": warmup,
        "weight_decay": args.weight_decay,
        "scst_sequences": args.scst_sequences,
        "scst_num_sequences": args.scst_num_sequences,
        "scst_learning_rate": args.scst_learning_rate,
        "scst_steps": args.scst_steps,
        "scst_max_epochs": per(scst_images, images),
        "scst_steps_per_epoch": scst_steps_per_epoch,
        "scst_patience_evaluations": args.scst_patience,
        "eval_every": args.eval_every,
        "use_memory": config.use_memory,
        "memory_warmup_steps": config.memory_warmup_steps if config.use_memory else None,
        "memory_refresh_every": config.memory_refresh_every if config.use_memory else None,
        "memory_ramp_steps": config.memory_ramp_steps if config.use_memory else None,
        "memory_prior": config.memory_prior if config.use_memory else None,
        "images_seen": xe_images + scst_images,
        "captions_seen": xe_captions + scst_images * args.scst_num_sequences,
    }


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
