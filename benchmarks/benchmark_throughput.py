#!/usr/bin/env python
"""Training throughput of Selfie pretraining against a supervised ResNet-50, on one device.

    python -m benchmarks.benchmark_throughput --output_file outputs/throughput.json

For the CIFAR grid (32x32 images, 8x8 patches, the 3x3 stem) and the ImageNet grid (224x224 images, 32x32 patches,
the 7x7 stem), at the same batch size and precision, it measures

    peer        a supervised training step of timm's ResNet with the preset's stem (the reference)
    selfie      a SelfieForMaskedPatchPrediction training step (the config's objective, Selfie's by default)
    selfie_split                the same with SplitMask's split-and-match objective (both halves fill in each other)
    selfie_split_contrastive    and with its image-level InfoNCE term too
    script      run_pretraining.py's own Trainer end to end, on real images (CIFAR-10, upscaled for 224x224)
    finetune    a SelfieForImageClassification training step (P, stage 4, classifier)
    finetune_script             run_image_classification.py's own Trainer end to end, on real labelled images
    decode      reading and decoding the images alone
    transform   decoding and the training transforms
    loader      the training DataLoader: its workers, decoding, transforms, masks and collation

and reports images/s (the median of --repeats runs, made round after round, each of them beside it), the ratio to
the peer, each script's ratio to its bare step and the milliseconds per step that it spends outside the model (data,
optimizer, schedule, bookkeeping), FLOPs per image of a training step (forward and backward, counted by
`torch.utils.flop_counter`), the TFLOP/s achieved, and peak memory. On CUDA the steps run under bf16 autocast, on
the CPU in float32; with channels_last weights and images on CUDA (--channels_last says otherwise). Every run of a
measurement is a process of its own, so that its peak memory and compiled code are its own. The table comes last;
the JSON holds it, the settings and the package versions.
"""

import functools
import logging
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from datasets import Image as ImageFeature
from torch.utils.flop_counter import FlopCounterMode
from transformers import HfArgumentParser, TrainerCallback
from transformers.modelcard import make_markdown_table

from modeling_selfie import (
    SelfieConfig,
    SelfieForImageClassification,
    SelfieForMaskedPatchPrediction,
    preset_image_processor,
    random_patch_mask,
)
from modeling_selfie.modeling_selfie import create_resnet
from selfie_training import classification, pretraining
from selfie_training.data import (
    DataArguments,
    RandomStream,
    collate_images,
    find_image_column,
    image_transform,
    load_splits,
    read_image,
    with_image_transform,
)
from selfie_training.environment import package_versions
from selfie_training.runner import ModelArguments, build_config, run, save_json


logger = logging.getLogger(__name__)

MODEL_STEPS = ("peer", "selfie", "selfie_split", "selfie_split_contrastive", "script", "finetune", "finetune_script")
# Each script and the bare step of its model, to which it is compared.
SCRIPT_STEPS = {"script": "selfie", "finetune_script": "finetune"}
# The pretraining objectives measured, and the config fields each sets ("selfie": the config's own, by default
# Selfie's random mask; the split ones hide half the grid, their own default).
OBJECTIVES = {
    "selfie": {},
    "selfie_split": {"masking_strategy": "split", "num_masked_patches": None},
    "selfie_split_contrastive": {
        "masking_strategy": "split",
        "num_masked_patches": None,
        "image_contrastive_weight": 0.5,
    },
}
DATA_STEPS = ("decode", "transform", "loader")
# On a GPU, the batch sizes of the usual supervised ResNet-50 references; small ones where the CPU does the work.
DEFAULT_BATCH_SIZES = {"cuda": {"cifar10": 512, "imagenet224": 256}, "cpu": {"cifar10": 32, "imagenet224": 8}}
NUM_CLASSES = {"cifar10": 10, "imagenet224": 1000}


@dataclass
class BenchmarkArguments:
    grids: list[str] = field(
        default_factory=lambda: ["cifar10", "imagenet224"],
        metadata={"help": "Presets to measure: cifar10 (32x32, 8x8 patches) and/or imagenet224 (224x224, 32x32)."},
    )
    measurements: list[str] = field(
        default_factory=lambda: [*MODEL_STEPS, *DATA_STEPS], metadata={"help": "Which of them to measure."}
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Images per step. Default: 512 (CIFAR) / 256 (ImageNet) on CUDA, 32 / 8 on CPU."},
    )
    steps: int | None = field(default=None, metadata={"help": "Timed steps. Default: 50 on CUDA, 30 on CPU."})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Untimed steps first. Default: 10 on CUDA, 3 on CPU."}
    )
    repeats: int = field(
        default=3, metadata={"help": "Runs of every measurement, each in a fresh process: the median is reported."}
    )
    backbone: str = field(default="resnet50", metadata={"help": "The timm ResNet of the peer and of Selfie."})
    backbone_kwargs: str | None = field(default=None, metadata={"help": "JSON of timm.create_model arguments."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "SelfieConfig fields, e.g. 'hidden_size=64'."}
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "torch.compile every model (the Trainer's flag too)."}
    )
    channels_last: bool | None = field(
        default=None,
        metadata={
            "help": "channels_last weights and images. Default: on CUDA. On the CPU it is faster too, but oneDNN's "
            "channels_last convolution backward crashes (segfault) for some tiny layers in torch 2.14."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Real images for the script and data measurements: a folder or a Hub dataset, e.g. "
            "uoft-cs/cifar10. Default: the scripts' embedded handwritten digits."
        },
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "DataLoader workers. Default: all cores but one on CUDA (16 at most), 1 on CPU."},
    )
    resident_images: bool = field(
        default=True,
        metadata={
            "help": "The scripts' --resident_images: False times their per-image pipeline with workers, for a "
            "dataset that fits in memory."
        },
    )
    output_file: str = field(
        default="outputs/benchmark_throughput.json", metadata={"help": "Where to write the JSON."}
    )


@dataclass
class Settings:
    """What every measurement of one grid shares."""

    grid: str
    device: str
    batch_size: int
    steps: int
    warmup_steps: int
    workers: int
    config: dict
    args: BenchmarkArguments

    @property
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device == "cuda" else nullcontext()

    @property
    def channels_last(self) -> bool:
        return self.args.channels_last if self.args.channels_last is not None else self.device == "cuda"

    def model_config(self, num_labels: int | None = None, **fields) -> SelfieConfig:
        config = SelfieConfig.from_dict({**self.config, **fields})
        if num_labels is not None:
            config.num_labels = num_labels
        return config


def main(argv: list[str] | None = None) -> list[dict]:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    for flag, names, known in (
        ("--grids", args.grids, NUM_CLASSES),
        ("--measurements", args.measurements, MEASUREMENTS),
    ):
        if unknown := [name for name in names if name not in known]:
            raise ValueError(f"{flag} {' '.join(unknown)}: choose among {', '.join(known)}.")
    for flag, value, least in (
        ("--repeats", args.repeats, 1),
        ("--steps", args.steps, 1),
        ("--batch_size", args.batch_size, 1),
        ("--warmup_steps", args.warmup_steps, 0),
        ("--dataloader_num_workers", args.dataloader_num_workers, 0),
    ):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value} must be at least {least}.")
    logging.basicConfig(
        format="%(asctime)s - %(message)s", level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)]
    )
    device = in_own_process(probe_device)  # the parent keeps off the GPU, whose memory the measurements share
    precision = "bf16 autocast" if device["type"] == "cuda" else "float32"
    report = {
        "command": " ".join(
            ["python -m benchmarks.benchmark_throughput", *(argv if argv is not None else sys.argv[1:])]
        ),
        "environment": package_versions(),
        "device": device["name"],
        "precision": precision,
        "arguments": asdict(args),
    }
    rows = []
    for grid in args.grids:
        settings = _settings(args, grid, device["type"])
        report["precision"] = precision + (", channels_last" if settings.channels_last else "")
        runs = {measurement: [] for measurement in args.measurements}
        # Round after round of every measurement, so that a drift of the machine's speed weighs on each alike.
        for repeat in range(1, args.repeats + 1):
            for measurement in args.measurements:
                logger.info(
                    "%s: measuring %s (batch %d), run %d of %d",
                    *(grid, measurement, settings.batch_size, repeat, args.repeats),
                )
                runs[measurement].append(in_own_process(MEASUREMENTS[measurement], settings))
            grid_rows = [
                {"grid": grid, "measurement": measurement, "batch_size": settings.batch_size, **median(done)}
                for measurement, done in runs.items()
            ]
            _add_ratios(rows + grid_rows)
            save_json(args.output_file, {**report, "results": rows + grid_rows})  # a failure later loses nothing
        rows += grid_rows
    print(f"\n{device['name']}, torch {torch.__version__}, {report['precision']}; written to {args.output_file}\n")
    print(format_table(rows))
    return rows


def median(runs: list[dict]) -> dict:
    """The run of median images/s, with every run's images/s and the largest peak memory beside it; a script's
    in-process figures, the median of every run's."""
    rates = [run["images_per_second"] for run in runs]
    middle = sorted(runs, key=lambda run: run["images_per_second"])[(len(runs) - 1) // 2]
    result = {
        **middle,
        "images_per_second_runs": rates,
        "peak_memory_gib": max(run["peak_memory_gib"] for run in runs),
    }
    for key in ("in_process_ratio_to_step", "in_process_ms_per_step_outside_model"):  # a script's, on the CPU
        if key in middle:
            result[key] = statistics.median(run[key] for run in runs)
            result[f"{key}_runs"] = [run[key] for run in runs]
    return result


def _settings(args: BenchmarkArguments, grid: str, device: str) -> Settings:
    on_cuda = device == "cuda"
    model_args = ModelArguments(
        backbone=args.backbone, backbone_kwargs=args.backbone_kwargs, config_overrides=args.config_overrides
    )
    return Settings(
        grid=grid,
        device=device,
        batch_size=args.batch_size or DEFAULT_BATCH_SIZES[device][grid],
        steps=args.steps or (50 if on_cuda else 30),
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else (10 if on_cuda else 3),
        workers=args.dataloader_num_workers
        if args.dataloader_num_workers is not None
        else (min(16, os.cpu_count() - 1) if on_cuda else 1),
        config=build_config(model_args, grid).to_dict(),  # as run_pretraining.py builds it from the same flags
        args=args,
    )


def probe_device() -> dict:
    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name()}
    return {"type": "cpu", "name": f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"}


# Each measurement: Settings -> {"images_per_second": ..., and where it applies "flops_per_image", "peak_memory_gib"}.


def measure_peer(settings: Settings) -> dict:
    """A supervised step of timm's ResNet (stem as the preset's): cross-entropy on random labels."""
    resnet = create_resnet(settings.model_config())
    resnet.reset_classifier(NUM_CLASSES[settings.grid])
    labels = torch.randint(NUM_CLASSES[settings.grid], (settings.batch_size,))
    return _measure_step(
        settings, resnet, {"labels": labels}, lambda model, images, labels: F.cross_entropy(model(images), labels)
    )


def measure_selfie(settings: Settings, objective: str = "selfie") -> dict:
    """A pretraining step with one of the `OBJECTIVES`, a fresh mask for every image (made on the host, as the data
    pipeline makes them)."""
    config = settings.model_config(**OBJECTIVES[objective])
    mask = random_patch_mask(settings.batch_size, config.num_patches, config.num_masked_patches)
    return _measure_step(
        settings,
        SelfieForMaskedPatchPrediction(config),
        {"bool_masked_pos": mask},
        lambda model, images, bool_masked_pos: model(images, bool_masked_pos=bool_masked_pos).loss,
    )


def measure_finetune(settings: Settings) -> dict:
    """A fine-tuning step of the classifier that a Selfie checkpoint starts (the resnet head)."""
    labels = torch.randint(NUM_CLASSES[settings.grid], (settings.batch_size,))
    return _measure_step(
        settings,
        SelfieForImageClassification(settings.model_config(num_labels=NUM_CLASSES[settings.grid])),
        {"labels": labels},
        lambda model, images, labels: model(images, labels=labels).loss,
    )


def _measure_step(settings: Settings, model: torch.nn.Module, inputs: dict, loss_of) -> dict:
    """Time `steps` AdamW training steps of `model` on one batch of random images and `inputs`, kept on the device
    (`loss_of(model, images, **inputs)` is the loss). Count the FLOPs of one forward and backward pass apart, so that
    counting does not slow the timed steps; on CUDA, count the host-device synchronisations of one step."""
    device = torch.device(settings.device)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    height, width = settings.model_config().image_height_width
    images = torch.randn(settings.batch_size, 3, height, width, device=device).contiguous(memory_format=memory_format)
    inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=settings.device == "cuda")
    compiled = torch.compile(model) if settings.args.torch_compile else model

    def forward_backward(model):
        with settings.autocast:
            loss = loss_of(model, images, **inputs)
        loss.backward()

    def step():
        forward_backward(compiled)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = _count_flops(lambda: forward_backward(model))
    optimizer.zero_grad(set_to_none=True)
    seconds = _time(step, settings)
    return {
        "images_per_second": settings.batch_size * settings.steps / seconds,
        "flops_per_image": flops / settings.batch_size,
        **_host_syncs(step, settings),
        **_compile_report(settings),
    }


def _host_syncs(step, settings: Settings) -> dict:
    """On CUDA, the operations of one step that made the host wait for the device (torch's sync debug mode)."""
    if settings.device != "cuda":
        return {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"host_syncs_per_step": sum("synchroniz" in str(warning.message) for warning in caught)}


def _count_flops(run) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def _time(step, settings: Settings) -> float:
    for _ in range(settings.warmup_steps):
        step()
    _synchronize(settings.device)
    start = time.perf_counter()
    for _ in range(settings.steps):
        step()
    _synchronize(settings.device)
    return time.perf_counter() - start


def _synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _compile_report(settings: Settings) -> dict:
    """Proof that torch.compile took effect: the graphs it compiled, and the breaks that cut them."""
    if not settings.args.torch_compile:
        return {}
    counters = torch._dynamo.utils.counters
    return {
        "compiled_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def measure_script(settings: Settings) -> dict:
    """run_pretraining.py's Trainer on real images: its data pipeline (workers, decoding, transforms, masks), the
    Trainer's step (optimizer, gradient clipping, learning-rate schedule) and its bookkeeping, timed from the end of
    the warm-up steps to the end of the last step."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, *_ = pretraining.build_trainer(_script_flags(settings, output_dir))
        return _time_script(trainer, settings)


def measure_finetune_script(settings: Settings) -> dict:
    """run_image_classification.py's Trainer on real labelled images, from fresh weights (a pretrained checkpoint's
    step is the same), timed as `measure_script` times pretraining."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, _ = classification.build_trainer(*classification.parse(_script_flags(settings, output_dir)))
        return _time_script(trainer, settings)


def _time_script(trainer, settings: Settings) -> dict:
    """Train with a `StepTimer`: images/s, and on the CPU the milliseconds a step spent outside the model's own step
    and the model's share of the step, both measured in this process (`StepTimer.model_seconds`). Not with
    DataLoader workers, which share the cores with the model: the time their work takes from the model's step would
    count as the model's."""
    split = settings.device == "cpu" and trainer.args.dataloader_num_workers == 0  # the resident pipeline has none
    timer = StepTimer(settings.warmup_steps, settings.device, split)
    trainer.add_callback(timer)
    trainer.training_step = timer.in_model(trainer.training_step)
    trainer.train()
    result = {"images_per_second": settings.batch_size * settings.steps / timer.seconds, **_compile_report(settings)}
    if timer.model_seconds is not None:
        result["in_process_ratio_to_step"] = timer.model_seconds / timer.seconds
        result["in_process_ms_per_step_outside_model"] = 1000 * (timer.seconds - timer.model_seconds) / settings.steps
    return result


def _script_flags(settings: Settings, output_dir: str) -> list[str]:
    args = settings.args
    flags = [
        "--preset", settings.grid,
        "--backbone", args.backbone,
        "--output_dir", output_dir,
        "--do_train",
        "--max_steps", str(settings.warmup_steps + settings.steps),
        "--per_device_train_batch_size", str(settings.batch_size),
        "--dataloader_num_workers", str(settings.workers),
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "True",
        "--log_level", "warning",
        "--use_cpu", str(settings.device == "cpu"),
        "--bf16", str(settings.device == "cuda"),
        "--channels_last", str(settings.channels_last),
        "--torch_compile", str(args.torch_compile),
        "--resident_images", str(args.resident_images),
    ]  # fmt: skip
    for name in ("dataset_name", "backbone_kwargs", "config_overrides"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", getattr(args, name)]
    return flags


class StepTimer(TrainerCallback):
    """Wall time from the end of training step `warmup_steps` to the end of the last step. With `split_steps` (on the
    CPU, where each operation ends before the next begins), also `model_seconds`: the part of that time spent in what
    the bare step does (the Trainer's `training_step`, forward and backward, wrapped with `in_model`; the optimizer's
    step), so that the rest is the loop's own cost measured in the same steps, whatever the machine's speed does
    meanwhile. On CUDA the host runs ahead of the device: timing parts of a step would take synchronisations that
    change it."""

    def __init__(self, warmup_steps: int, device: str, split_steps: bool = False):
        self.warmup_steps, self.device = warmup_steps, device
        self.start = self.seconds = self.optimizer_start = None
        self.model_seconds = 0.0 if split_steps else None

    def in_model(self, function):
        """`function`, its time added to `model_seconds` once the warm-up steps are done."""
        if self.model_seconds is None:
            return function

        @functools.wraps(function)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if self.start is not None:
                    self.model_seconds += time.perf_counter() - start

        return timed

    def on_train_begin(self, args, state, control, **kwargs):
        if self.warmup_steps == 0:
            self.start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):  # which the Trainer calls after the step
        if self.model_seconds is not None and self.start is not None:
            self.model_seconds += time.perf_counter() - self.optimizer_start

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            _synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        _synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def _real_images(settings: Settings, count: int):
    """`count` training images of --dataset_name, undecoded, and the name of their column."""
    train = load_splits(DataArguments(dataset_name=settings.args.dataset_name, max_train_samples=count))["train"]
    column = find_image_column(train, None)
    return train.cast_column(column, ImageFeature(decode=False)), column


def measure_decode(settings: Settings) -> dict:
    """Reading and decoding to RGB, in this one process."""
    return _time_per_image(settings, read_image)


def measure_transform(settings: Settings) -> dict:
    """Decoding and the training transforms (crop and flip, to tensor, normalisation), in this one process."""
    transform = image_transform(preset_image_processor(settings.grid), train=True)
    return _time_per_image(settings, lambda entry: transform(read_image(entry)))


def _time_per_image(settings: Settings, process) -> dict:
    count = settings.batch_size * settings.steps
    images, column = _real_images(settings, count)
    entries = images[column]
    start = time.perf_counter()
    for entry in entries:
        process(entry)
    return {"images_per_second": count / (time.perf_counter() - start)}


def measure_loader(settings: Settings) -> dict:
    """The training DataLoader as the Trainer builds it (workers, pinned memory on CUDA), batches read and dropped."""
    count = settings.batch_size * (settings.warmup_steps + settings.steps)
    images, column = _real_images(settings, count)
    config = settings.model_config()
    dataset = with_image_transform(
        images,
        image_transform(preset_image_processor(settings.grid), train=True),
        column,
        stream=RandomStream(0),
        mask_sizes=(config.num_patches, config.num_masked_patches),
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=collate_images,
        pin_memory=settings.device == "cuda",
    )
    batches = iter(loader)
    for _ in range(settings.warmup_steps):  # the workers' start-up
        next(batches)
    start = time.perf_counter()
    for _ in range(settings.steps):
        next(batches)
    return {"images_per_second": settings.batch_size * settings.steps / (time.perf_counter() - start)}


MEASUREMENTS = {
    "peer": measure_peer,
    **{objective: functools.partial(measure_selfie, objective=objective) for objective in OBJECTIVES},
    "script": measure_script,
    "finetune": measure_finetune,
    "finetune_script": measure_finetune_script,
    "decode": measure_decode,
    "transform": measure_transform,
    "loader": measure_loader,
}


def in_own_process(function, *args):
    """`function(*args)` in a fresh process, with the peak memory it took (CUDA: allocated by torch; CPU: resident
    memory above the process's at its start) added to a dict result. A failure in the process raises here.

    The process is forked from a fork server that has imported the libraries and never computed anything: a fork
    of a process whose thread pools have run (a test session, say) can deadlock in them, and spawning afresh would
    import torch again for every measurement."""
    # A CUDA check in the fork server must not initialise CUDA there, which its forked children could then not use:
    # torch asks NVML instead with this (read by the server, which inherits it, at every check).
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["selfie_training.pretraining"]
    )  # imports all the others; read when the server starts
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_run_and_send, args=(sender, function, args))
    process.start()
    sender.close()
    try:
        outcome, result = receiver.recv()
    except EOFError:  # it died without a word
        process.join()
        outcome, result = "failed", f"the process ended with exit status {process.exitcode}"
    process.join()
    if outcome == "user error":
        raise ValueError(result)  # a bad flag or dataset: one line, as from the training scripts
    if outcome == "failed":
        raise RuntimeError(f"{function.__name__} failed: {result}")
    return result


def _run_and_send(sender, function, args):
    # DataLoader workers fork from the measuring process, as they do by default on Linux up to Python 3.13.
    multiprocessing.set_start_method("fork", force=True)
    try:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = function(*args)
        if isinstance(result, dict):
            result["peak_memory_gib"] = _peak_memory(baseline)
        sender.send(("done", result))
    except ValueError as error:
        sender.send(("user error", str(error)))
    except BaseException:
        sender.send(("failed", traceback.format_exc()))


def _peak_memory(baseline_kib: int) -> float:
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 2**20


def _add_ratios(rows: list[dict]):
    """Images/s over the peer's; each script's images/s over its bare step's (medians, and round by round), and the
    time per step it spends outside the model; TFLOP/s (a script counts as many FLOPs as its bare step)."""
    by_key = {(row["grid"], row["measurement"]): row for row in rows}
    for row in rows:
        peer = by_key.get((row["grid"], "peer"))
        if peer is not None and row["measurement"] in MODEL_STEPS:
            row["ratio_to_peer"] = row["images_per_second"] / peer["images_per_second"]
        step = by_key.get((row["grid"], SCRIPT_STEPS.get(row["measurement"])))
        if step is not None:
            row["flops_per_image"] = step["flops_per_image"]
            row["ratio_to_step"] = row["images_per_second"] / step["images_per_second"]
            # Round by round, the script's run over its step's run of the same round: the spread of the ratio.
            rounds = zip(row["images_per_second_runs"], step["images_per_second_runs"], strict=True)
            row["ratio_to_step_runs"] = [script / bare for script, bare in rounds]
            seconds_per_image = 1 / row["images_per_second"] - 1 / step["images_per_second"]
            row["ms_per_step_outside_model"] = 1000 * row["batch_size"] * seconds_per_image
        if "flops_per_image" in row:
            row["tflops_per_second"] = row["flops_per_image"] * row["images_per_second"] / 1e12


def format_table(rows: list[dict]) -> str:
    def number(row, key, digits):
        return f"{row[key]:,.{digits}f}" if key in row else "-"

    lines = [
        {
            "grid": row["grid"],
            "measurement": row["measurement"],
            "batch": row["batch_size"],
            "images/s": number(row, "images_per_second", 1),
            "runs": " / ".join(f"{rate:,.1f}" for rate in row["images_per_second_runs"]),
            "x peer": number(row, "ratio_to_peer", 2),
            "x step": number(row, "ratio_to_step", 3),
            "ms/step outside": number(row, "ms_per_step_outside_model", 1),
            "GFLOP/image": f"{row['flops_per_image'] / 1e9:.2f}" if "flops_per_image" in row else "-",
            "TFLOP/s": number(row, "tflops_per_second", 3),
            "peak GiB": number(row, "peak_memory_gib", 2),
        }
        for row in rows
    ]
    return make_markdown_table(lines)


if __name__ == "__main__":
    run(main)
