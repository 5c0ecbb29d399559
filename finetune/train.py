"""`python -m finetune`: fine-tune a ChatGLM model folder on a JSONL dataset with transformers' Trainer.

    python -m finetune --model demo/tiny-chatglm2 --train-file finetune/data/facts.jsonl \\
        --method lora --output-dir out/lora --num-train-epochs 30 --learning-rate 3e-3

Every TrainingArguments option is accepted as `--name` or `--name-with-dashes` (resume_from_checkpoint,
gradient_accumulation_steps, bf16, logging_steps, report_to, save_steps, ...); `--help` lists them.
Under `torchrun --nproc_per_node N` the same command trains with DDP (gloo on CPU).
"""

import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import data as data_module
from .model import (
    add_lora,
    load_base,
    load_prefix_into,
    load_tokenizer,
    merge_lora,
    prefix_state,
    read_prefix,
    save_prefix,
)

logger = logging.getLogger("finetune")

# Environment variables through which launchers (torchrun, mpirun, accelerate) give the world size.
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
MERGED_FOLDER = "merged"


@dataclass
class FinetuneArguments:
    model: str = field(metadata={"help": "model folder to fine-tune (loaded with trust_remote_code=True)"})
    train_file: list[str] = field(default=None, metadata={"help": "JSONL training data, one or more files (chat messages or content/summary pairs)"})
    method: str = field(default="lora", metadata={"help": "lora or ptuning (P-Tuning v2)", "choices": ["lora", "ptuning"]})
    pre_seq_len: int = field(default=128, metadata={"help": "P-Tuning v2: number of learned prefix positions"})
    prefix_projection: bool = field(default=False, metadata={"help": "P-Tuning v2: two-layer MLP over the prefix"})
    lora_target: str = field(default="query_key_value", metadata={"help": "LoRA: comma-separated names of the linears to adapt"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=32, metadata={"help": "LoRA alpha (scale alpha/r)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    quantize: int = field(default=0, metadata={"help": "freeze the base quantized to 4 or 8 bits (model.quantize)", "choices": [0, 4, 8]})
    merge: bool = field(default=False, metadata={"help": f"LoRA: also write OUTPUT_DIR/{MERGED_FOLDER}, the base with the adapter merged in"})
    prompt_column: str = field(default="content", metadata={"help": "prompt key of prompt/answer records (ADGEN: content)"})
    response_column: str = field(default="summary", metadata={"help": "answer key of prompt/answer records (ADGEN: summary)"})
    max_source_length: int = field(default=512, metadata={"help": "prompt tokens kept (longer prompts lose their oldest tokens, reported)"})
    max_target_length: int = field(default=512, metadata={"help": "answer tokens kept, eos included (longer answers are cut, reported)"})
    dry_run: bool = field(default=False, metadata={"help": "print the first encoded examples with their label masks and the truncation report, then stop"})
    dry_run_examples: int = field(default=2, metadata={"help": "how many examples --dry-run prints"})


class LaunchError(ValueError):
    pass


def launcher_world_size():
    for name in WORLD_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def accelerator_present():
    if torch.cuda.is_available():
        return True
    for backend in ("mps", "xpu"):
        module = getattr(torch.backends, backend, None) or getattr(torch, backend, None)
        if module is not None and getattr(module, "is_available", lambda: False)():
            return True
    return False


def check_launch(namespace):
    """Settle how this process runs before TrainingArguments set up devices (which they do when built).

    * `accelerate launch --num_processes N --cpu` starts ONE process (accelerate starts several CPU
      processes only through mpirun); it leaves MASTER_ADDR set and no world size. Refused, with
      the commands that work.
    * Without CUDA (or MPS/XPU), TrainingArguments must get `use_cpu`: otherwise under torchrun
      each process trains alone (transformers reports ParallelMode.NOT_PARALLEL) and bf16 is
      refused. It becomes the default there.
    * `--ddp_backend gloo` in a single process makes accelerate ask torch.distributed for a world
      size that was never set up ("Default process group has not been initialized"); a single
      process needs no backend, so it is dropped.
    """
    world_size = launcher_world_size()
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in os.environ and world_size == 1:
        raise LaunchError(
            "accelerate launch --cpu started a single process (it starts several CPU processes only through mpirun); "
            "for N CPU processes run `torchrun --nproc_per_node N -m finetune ...` or "
            "`accelerate launch --multi_gpu --num_processes N -m finetune ...` (without CUDA they train on the CPU with gloo)"
        )
    if not accelerator_present() and not namespace.use_cpu:
        namespace.use_cpu = True
    if world_size == 1 and namespace.ddp_backend is not None:
        logger.warning("--ddp_backend %s ignored: a single process has no process group", namespace.ddp_backend)
        namespace.ddp_backend = None


def parse_arguments(argv=None):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((FinetuneArguments, TrainingArguments), description=__doc__)
    # Our dataset yields exactly the model's inputs, and the logs should say how training goes. Every
    # trainable parameter (adapter or prefix) takes part in every step, so DDP need not search for unused ones.
    parser.set_defaults(
        remove_unused_columns=False, logging_steps=10, report_to="none", ddp_find_unused_parameters=False
    )
    namespace = parser.parse_args(argv)
    check_launch(namespace)
    if namespace.gradient_checkpointing and not namespace.gradient_checkpointing_kwargs:
        # Non-reentrant checkpointing also backpropagates to adapters and prefixes over frozen inputs.
        namespace.gradient_checkpointing_kwargs = {"use_reentrant": False}
    built = []
    for kind in (FinetuneArguments, TrainingArguments):
        names = {item.name for item in fields(kind) if item.init}
        built.append(kind(**{name: value for name, value in vars(namespace).items() if name in names}))
    options, training = built
    if options.train_file is None:
        parser.error("--train-file is required")
    if options.merge and options.method != "lora":
        parser.error("--merge applies to --method lora (a P-Tuning v2 prefix is loaded on top of the base instead)")
    if options.method == "ptuning" and training.load_best_model_at_end:
        parser.error("--load_best_model_at_end is not supported with --method ptuning")
    return options, training


class PrefixTrainer:
    """Mixin for P-Tuning v2: checkpoints and the final save hold only the prefix encoder."""

    def _save(self, output_dir=None, state_dict=None):
        from transformers.trainer import TRAINING_ARGS_NAME

        output_dir = output_dir or self.args.output_dir
        prefix = prefix_state(self.model) if state_dict is None else {
            name: tensor for name, tensor in state_dict.items() if name.startswith("transformer.prefix_encoder.")
        }
        save_prefix(prefix, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        load_prefix_into(getattr(model, "module", model), read_prefix(resume_from_checkpoint))


def build_dataset(options, tokenizer):
    records = [
        record
        for path in options.train_file
        for record in data_module.read_records(path, options.prompt_column, options.response_column)
    ]
    return data_module.encode(tokenizer, records, options.max_source_length, options.max_target_length)


def dry_run(options, tokenizer, examples, report):
    print(f"{len(examples)} examples from {', '.join(options.train_file)}")
    print(report.describe(len(examples)) or "no example was truncated")
    for index, example in enumerate(examples[: options.dry_run_examples], start=1):
        print()
        print(data_module.describe_example(tokenizer, example, index))


def train(options, training):
    from transformers import Trainer, set_seed

    is_main = training.process_index == 0
    tokenizer = load_tokenizer(options.model)
    examples, report = build_dataset(options, tokenizer)
    if options.dry_run:
        if is_main:
            dry_run(options, tokenizer, examples, report)
        return None
    if report.count and is_main:
        logger.warning(report.describe(len(examples)))

    # Before the model is built: new adapters and prefixes are initialised at random.
    set_seed(training.seed)
    model = load_base(
        options.model, options.method, options.pre_seq_len, options.prefix_projection, options.quantize
    )
    if options.method == "lora":
        targets = [name.strip() for name in options.lora_target.split(",") if name.strip()]
        model = add_lora(model, targets, options.lora_rank, options.lora_alpha, options.lora_dropout)
    if is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.warning("%s: %d examples; training %d of %d parameters", options.method, len(examples), trainable, total)

    trainer_class = type("PrefixTrainer", (PrefixTrainer, Trainer), {}) if options.method == "ptuning" else Trainer
    trainer = trainer_class(
        model=model,
        args=training,
        train_dataset=data_module.ExampleDataset(examples),
        data_collator=data_module.Collator(tokenizer),
        processing_class=tokenizer,
    )
    result = trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        logger.warning("saved the %s weights to %s (%.0f s of training)", options.method, training.output_dir, result.metrics["train_runtime"])
        if options.merge:
            merged = merge_lora(options.model, training.output_dir, Path(training.output_dir) / MERGED_FOLDER)
            logger.warning("wrote the merged model to %s", merged)
    return trainer


def main(argv=None):
    logging.basicConfig(format="%(name)s: %(message)s")
    try:
        options, training = parse_arguments(argv)
        train(options, training)
    except (LaunchError, data_module.DataError) as error:
        sys.exit(f"error: {error}")
    return 0
