"""Setting a training run up, as named steps in the order `setup` takes them: check the flags, load the data, make the
config and the run's identity, check the run directory, build the model, open the run directory, build the loaders,
the optimizer and scheduler, and restore a checkpoint.

Every check that can fail (arguments, dataset, columns, labels, shots, output directory, checkpoint, base model
and DPT config) runs before `RunDir.open` writes the first file to --output_dir, so a bad input never costs training
time and a corrected retry finds the directory as it was; a failure after it releases the directory's lock.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import DPTConfig
from ..data.batching import ImageBatcher
from ..data.coop_splits import save_split_file
from ..data.datasets import FewShotData, load_tasks
from ..data.few_shot import data_fingerprint
from ..data.run_loaders import LoaderSpec, RunLoaders, build_loaders
from ..lora_adapter import LoraClassifierConfig, clip_lora_config
from ..lora_classifier import LoraClassifier
from ..prototypes import init_visual_prompts_from_prototypes
from ..sources import load_base_model, load_image_processor, load_tokenizer
from ..utils.errors import UserInputError
from .arguments import TrainArguments
from .checkpoint_files import VerifiedCheckpoint, checkpoint_to_resume
from .checkpoints import Checkpointer
from .lora_schedule import use_iteration_stream
from .recipe import LoraRecipe, Recipe, build_lora_optimizer, build_lora_scheduler, build_optimizer, build_scheduler
from .run_dir import RunDir, check_run_flags, normalized
from .run_layout import SPLITS_DIR, TRACKER_DIR
from .run_state import Run, RunState

logger = logging.getLogger(__name__)


def setup(args: TrainArguments, config_overrides: dict) -> Run:
    """What a run does before its first epoch, step by step. Every refusal comes before `run_dir.open`, the first
    write; a failure after it releases the directory's lock."""
    resume = args.resume_from_checkpoint
    # 1. Check the flags and the launcher, then start the processes.
    check_launcher()
    check_run_flags(args.output_dir, args.checkpoints_to_keep, args.overwrite_output_dir, resume)
    accelerator = make_accelerator(args)
    check_processes(args, accelerator)
    set_seed(args.seed)
    # 2. Data: every task's few-shot sets, checked.
    tasks = load_run_tasks(args)
    # 3. The DPT config and the run's identity (what run.json and every checkpoint record).
    config, identity = run_identity(args, config_overrides, tasks)
    # 4. The run directory's refusals (reads only), and the checkpoint to resume from, hash-checked.
    run_dir = RunDir(args.output_dir, resume=bool(resume), overwrite=args.overwrite_output_dir)
    run_dir.check(identity, accelerator)
    checkpoint = checkpoint_to_resume(resume, run_dir.path, identity) if resume else None
    # 5. The model, the last refusals; then the first write: the directory's lock and run.json.
    model, processor = build_model(args, config, tasks, from_prototypes=checkpoint is None)
    run_dir.open(identity, accelerator)
    try:
        write_run_records(run_dir, args, tasks, identity, accelerator)
        # 6. The loaders of every task.
        loaders = build_run_loaders(args, tasks, processor, accelerator)
        # 7. The optimizer and its schedule, and the checkpointer that saves them every epoch.
        recipe = args.recipe
        model, optimizer, scheduler, steps_per_epoch = build_optimization(args, recipe, model, loaders, accelerator)
        keep = args.checkpoints_to_keep
        checkpointer = Checkpointer(accelerator, model, optimizer, scheduler, loaders.generator, run_dir, keep)
        # 8. Where the loop starts: from scratch, or restored from the checkpoint.
        state = restore(checkpointer, checkpoint)
    except BaseException:
        run_dir.release()
        raise
    progress = tqdm(
        total=steps_per_epoch * args.epochs,
        initial=state.global_step,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    return Run(
        args=args,
        recipe=recipe,
        accelerator=accelerator,
        tasks=tasks,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loaders=loaders,
        run_dir=run_dir,
        checkpointer=checkpointer,
        identity=identity,
        steps_per_epoch=steps_per_epoch,
        state=state,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------- 1. check


def check_launcher() -> None:
    """FSDP and DeepSpeed are refused before anything is built: the frozen CLIP is replicated on each process and
    only the prompts (a few MB) train, so DDP (`accelerate launch --multi_gpu`) is what a run needs; sharding would
    matter only for a base too large for one device (README, "Distributed training")."""
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise UserInputError(
                f"{name} is not supported by dpt-peft train (the launcher set {variable}): the base CLIP is frozen and "
                "only a few MB of prompts train, so run data-parallel instead: `accelerate launch --multi_gpu "
                "--num_processes N -m dpt_peft train ...` (or `accelerate config` without FSDP/DeepSpeed)."
            )


def check_processes(args: TrainArguments, accelerator: Accelerator) -> None:
    """A lora run counts CLIP-LoRA's iterations of one batch on one device; several processes would each draw the
    same stream (no sharding of it is defined), so they are refused before any work."""
    if args.method == "lora" and accelerator.num_processes > 1:
        raise UserInputError(
            f"--method lora runs on one process (CLIP-LoRA's iterations are one device's batches); this launch has "
            f"{accelerator.num_processes}: run `dpt-peft train` without accelerate launch --multi_gpu."
        )


def make_accelerator(args: TrainArguments) -> Accelerator:
    """The run's processes, precision, gradient accumulation and trackers; a tracker or precision asked for that this
    machine cannot give is said once (Accelerate drops it quietly)."""
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to in ([], ["none"]) else args.report_to,
        project_dir=args.output_dir,
        # None: the launcher's setting (accelerate launch flags, its config file), as for mixed_precision.
        dynamo_backend=None if args.torch_compile is None else ("inductor" if args.torch_compile else "no"),
        # Every prompt gets a gradient in a step of one task (checked for each method, with and without guidance);
        # a multitask step may leave another task's parameters unused.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=len(args.datasets) > 1)],
    )
    if accelerator.is_main_process:
        kept = {str(getattr(tracker, "value", tracker)) for tracker in accelerator.log_with}
        for dropped in [name for name in args.report_to if name not in ("none", "all") and name not in kept]:
            logger.warning("--report_to %s: its package is not installed, so this run does not report to it.", dropped)
        used = accelerator.mixed_precision if accelerator.native_amp else "no"  # what the run records
        if args.mixed_precision not in (None, used):
            logger.warning(
                "--mixed_precision %s is not available on %s; this run uses %s (recorded as such).",
                args.mixed_precision,
                accelerator.device.type,
                used,
            )
    return accelerator


# ---------------------------------------------------------------------------------------------- 2. data, 3. identity


def load_run_tasks(args: TrainArguments) -> dict[str, FewShotData]:
    """Every task's few-shot training, validation and test sets, checked (`data.datasets.load_tasks`)."""
    tasks = load_tasks(args.data_spec)
    missing_val = [name for name, data in tasks.items() if args.eval_every and data.val is None]
    if missing_val:
        raise UserInputError(
            f"--eval_every needs a validation split, and {missing_val[0]} has none apart from its test split (which "
            "is never used for choices); train without --eval_every/--save_best."
        )
    return tasks


def run_identity(
    args: TrainArguments, config_overrides: dict, tasks: dict[str, FewShotData]
) -> tuple[DPTConfig | LoraClassifierConfig, dict]:
    """The run's DPTConfig (a lora run's classifier) and identity (its arguments, config and data fingerprint, as
    run.json records them)."""
    class_names = {name: data.class_names for name, data in tasks.items()} if len(tasks) > 1 else None
    class_names = class_names or next(iter(tasks.values())).class_names
    if args.method == "lora":
        return lora_identity(args, config_overrides, tasks, class_names)
    config = DPTConfig.for_method(args.method, class_names=class_names, **config_overrides)
    identity = {
        **args.run_identity(config),
        "data_fingerprint": data_fingerprint(tasks, args.image_column, args.label_column),
    }
    return config, normalized(identity)


def lora_identity(
    args: TrainArguments, config_overrides: dict, tasks: dict[str, FewShotData], class_names: list[str]
) -> tuple[LoraClassifierConfig, dict]:
    """A lora run's classifier (CLIP-LoRA's template and logit scale) and identity. A DPTConfig flag given with it is
    refused: it would have no effect (the values a run adds on its own, a shipped model's and a CoOp template, are
    not the user's)."""
    added = args.config_overrides({})
    given = next((name for name, value in config_overrides.items() if added.get(name, object()) != value), None)
    if given is not None:
        hint = " (--lora_template is the classifier's prompt)" if given == "zero_shot_template" else ""
        raise UserInputError(f"--{given} is a DPTConfig setting; a --method lora run has no use for it{hint}.")
    recipe = args.recipe
    classifier = LoraClassifierConfig(class_names, template=recipe.template, logit_scale=recipe.logit_scale)
    identity = {
        **args.run_identity(None),
        "class_names": class_names,
        "data_fingerprint": data_fingerprint(tasks, args.image_column, args.label_column),
    }
    return classifier, normalized(identity)


# ---------------------------------------------------------------------------------------------- 5. model


def build_model(
    args: TrainArguments,
    config: DPTConfig | LoraClassifierConfig,
    tasks: dict[str, FewShotData],
    *,
    from_prototypes: bool,
) -> tuple[PeftModel, object]:
    """The base model and its image processor, with the DPT adapter of `config` (the last refusals: a base model
    that does not load, a config it does not fit), or for a lora run PEFT's LoRA of the recipe and its classifier.
    With --visual_prompt_init prototype and `from_prototypes` (no checkpoint to restore), the visual prompts start
    from the training images' tokens."""
    base = load_base_model(args.model_name_or_path, attn_implementation=args.attn_implementation)
    processor = load_image_processor(args.model_name_or_path)
    if args.gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if isinstance(config, LoraClassifierConfig):
        recipe = args.recipe
        settings = {"encoder": recipe.encoder, "layers": recipe.layers, "targets": recipe.targets}
        lora = clip_lora_config(base, r=recipe.r, alpha=recipe.alpha, dropout=recipe.dropout, **settings)
        tokenizer = load_tokenizer(args.model_name_or_path)
        return LoraClassifier(base, lora, classifier=config, tokenizer=tokenizer), processor
    model = get_peft_model(base, config)
    if config.visual_prompt_init == "prototype" and from_prototypes:
        batcher = ImageBatcher(processor, args.image_column, args.label_column)
        loaders = [DataLoader(d.train, batch_size=args.eval_batch_size, collate_fn=batcher) for d in tasks.values()]
        init_visual_prompts_from_prototypes(
            model,
            (batch for loader in loaders for batch in loader),
            method=args.prototype_method,
            max_images=args.prototype_max_images,
            seed=args.seed,
        )
    return model, processor


# ---------------------------------------------------------------------------------------------- after the first write


def write_run_records(
    run_dir: RunDir, args: TrainArguments, tasks: dict[str, FewShotData], identity: dict, accelerator: Accelerator
) -> None:
    """What the run directory holds besides run.json from the start: the few-shot split of each benchmark task as
    JSON (`--split_file` reuses one on another machine) and, with --report_to, the tracker's logs."""
    if accelerator.is_main_process:
        for name, data in tasks.items():
            if data.split_indices is not None:
                relative = f"{SPLITS_DIR}/{name}.json"
                provenance = {"shots": args.shots, "seed": args.seed}
                run_dir.folder.write(  # recorded pending first: a kill never leaves a split file of unknown origin
                    relative,
                    functools.partial(
                        save_split_file, dataset_dict=data.split_source, indices=data.split_indices, **provenance
                    ),
                )
        if accelerator.log_with:  # the tracker's logs grow as it runs: the folder is recorded as the run's
            run_dir.folder.record_dir(TRACKER_DIR)
    if accelerator.log_with:
        accelerator.init_trackers(TRACKER_DIR, config={k: str(v) for k, v in identity.items()})


def build_run_loaders(
    args: TrainArguments, tasks: dict[str, FewShotData], processor, accelerator: Accelerator
) -> RunLoaders:
    """Every task's training, validation and test loaders (`data.run_loaders.build_loaders`), prepared."""
    spec = LoaderSpec(
        image_column=args.image_column,
        label_column=args.label_column,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        augment=args.augment,
        min_crop_scale=args.min_crop_scale,
        seed=args.seed,
        input_pipeline=args.input_pipeline,
        dataloader_num_workers=args.dataloader_num_workers,
        validation=bool(args.eval_every),
        cuda=accelerator.device.type == "cuda",
        processes=accelerator.num_processes,
    )
    loaders = build_loaders(tasks, processor, spec, main_process_first=accelerator.main_process_first)
    if args.method == "lora":  # CLIP-LoRA's iterations, cut into the loop's epochs (lora_schedule.py)
        use_iteration_stream(loaders, args.batch_size, args.recipe.iterations_per_epoch, args.seed)
    loaders.prepare(accelerator.prepare)
    return loaders


def build_optimization(
    args: TrainArguments, recipe: Recipe | LoraRecipe, model: PeftModel, loaders: RunLoaders, accelerator: Accelerator
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, int]:
    """The prepared model and optimizer, the scheduler and the optimizer steps of an epoch. The scheduler is stepped
    once per optimizer update by the loop (not prepared: Accelerate would step it once per process): DPT's warm-up
    and restarted cosine, or CLIP-LoRA's cosine over every update of the run."""
    lora = isinstance(recipe, LoraRecipe)
    optimizer = build_lora_optimizer(model, recipe) if lora else build_optimizer(model, recipe)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches_per_epoch = sum(len(loader) for loader in loaders.train.values())
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if lora:
        return model, optimizer, build_lora_scheduler(optimizer, recipe, steps_per_epoch * args.epochs), steps_per_epoch
    return model, optimizer, build_scheduler(optimizer, recipe, steps_per_epoch), steps_per_epoch


def restore(checkpointer: Checkpointer, checkpoint: VerifiedCheckpoint | None) -> RunState:
    """Where the loop starts: from scratch, or where `checkpoint` left it (adapter, optimizer, scheduler and random
    states restored on every process)."""
    if checkpoint is None:
        return RunState()
    checkpointer.restore(checkpoint)
    state = RunState.from_dict(checkpoint.state)
    checkpointer.accelerator.print(f"Resumed from {checkpoint.path} (epoch {state.epochs_done - 1} done)")
    return state
