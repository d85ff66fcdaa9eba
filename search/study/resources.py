"""Each trial's share of the GPU (0: the CPU) and how many trials run at once, on this machine or a cluster.

A given --gpus-per-trial is checked against the GPUs there are; 'auto' is measured: on this
machine by the probe in a process of its own (search.study.gpu_share.GpuProbe), started
first so that it overlaps the driver's caching and Ray's start; on a cluster by the same
measurement as a Ray task holding one of the cluster's GPUs, wherever it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import GetTimeoutError, RayTaskError

from search.errors import UsageError, one_line
from search.records.study_config import StudyConfig
from search.study.gpu_share import (
    CARD_ENV,
    GpuProbe,
    GpuTooSmall,
    choose_gpu_fraction,
    gib,
    measure_gpu,
    planned_free,
    rehearsed_card,
)
from search.study.preflight import CheckedStudy
from trainables.config import SpeedOptions


@dataclass(frozen=True)
class GpuShare:
    """Each trial's share of the GPU (0: the CPU), and how many trials run at once."""

    gpus_per_trial: float
    max_concurrent: int


def local_resources() -> tuple[int, int]:
    """(GPUs, CPU cores) of this machine: what a private Ray has."""
    return torch.cuda.device_count(), os.cpu_count() or 1


def cluster_resources() -> tuple[int, int]:
    """(GPUs, CPUs) of the Ray cluster joined: what its trials can be placed on, whichever node has them."""
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)), int(resources.get("CPU", 1))


def cluster_gpu_share(config: StudyConfig, checked: CheckedStudy) -> GpuShare:
    """The share on the cluster joined: 'auto' measured by a task on one of its GPU nodes (this machine may have
    no GPU), else as given; the trials at once from the whole cluster's GPUs or CPUs."""
    gpus, cpus = cluster_resources()
    if config.gpus_per_trial is not None or not gpus:
        return given_gpu_share(config, gpus, cpus)
    probe = ClusterGpuProbe(*probe_arguments(config, checked))
    try:
        return measured_gpu_share(config, probe, gpus)
    finally:
        probe.cancel()


def start_gpu_probe(config: StudyConfig, checked: CheckedStudy) -> GpuProbe | None:
    """--gpus-per-trial auto on a GPU machine: the memory probe of the heaviest configuration, started; else None."""
    if config.gpus_per_trial is not None or not torch.cuda.is_available():
        return None
    *arguments, model_knobs = probe_arguments(config, checked)
    return GpuProbe(*arguments, **model_knobs)


def probe_arguments(config: StudyConfig, checked: CheckedStudy) -> tuple:
    """What the GPU memory probe measures: the space's heaviest configuration, at the study's image size."""
    heaviest = checked.space.heaviest()
    return (
        config.model,
        len(checked.index.classes),
        heaviest.batch_size,
        config.img_size,
        SpeedOptions.of(config),  # the probe measures with the study's speed flags, as its trials train
        heaviest.model_knobs(),
    )


class ClusterGpuProbe:
    """GpuProbe's measurement as a Ray task holding one GPU of the cluster, wherever that GPU is.

    max_calls=1: the task's worker process exits after it, and its CUDA context with it.
    """

    WAIT_S = 600
    """A probe waits for a free GPU and then takes tens of seconds; longer than this, something is wrong."""

    def __init__(self, *arguments):
        task = ray.remote(num_gpus=1, num_cpus=1, max_calls=1)(measure_gpu)
        self._result = task.remote(*arguments)

    def result(self) -> tuple[int, int, int]:
        """(peak, free, total) bytes; re-raises the probe's own error (GpuTooSmall, NoCudaError...)."""
        try:
            return ray.get(self._result, timeout=self.WAIT_S)
        except RayTaskError as error:  # the probe's own error, as GpuProbe hands it back
            if isinstance(error.cause, (GpuTooSmall, RuntimeError)):
                raise error.cause from None
            raise RuntimeError(f"GPU memory probe: {type(error.cause).__name__}: {error.cause}") from None
        except GetTimeoutError:
            raise RuntimeError(f"no GPU of the cluster was free for {self.WAIT_S} s") from None

    def cancel(self) -> None:
        ray.cancel(self._result, force=True)


def given_gpu_share(config: StudyConfig, gpus: int, cpus: int) -> GpuShare:
    """The share --gpus-per-trial gives (0 for 'auto' without a GPU), checked against `gpus` GPUs and `cpus` CPUs."""
    gpus_per_trial = resolve_gpus(config.gpus_per_trial or 0.0, gpus)
    return GpuShare(
        gpus_per_trial, config.max_concurrent or trial_slots(gpus_per_trial, config.cpus_per_trial, gpus, cpus)
    )


def measured_gpu_share(config: StudyConfig, gpu_probe, gpus: int) -> GpuShare:
    """--gpus-per-trial auto: the share and the trials at once that the probe's numbers allow on `gpus` GPUs."""
    try:
        card = rehearsed_card()
        peak, free, total = gpu_probe.result()
        if card is not None:
            print(f"--gpus-per-trial auto: planning for a {gib(card)} card ({CARD_ENV})", flush=True)
        plan = choose_gpu_fraction(peak, planned_free(free, total, card), total)
    except (GpuTooSmall, ValueError) as error:  # ValueError: a CARD_ENV that is no size
        raise UsageError(str(error)) from None
    except RuntimeError as error:  # e.g. a GPU too full to open a CUDA context
        raise UsageError(
            f"--gpus-per-trial auto could not measure the GPU ({one_line(error)}): "
            f"give a share such as --gpus-per-trial 0.5, or 0 for the CPU"
        ) from None
    print(f"--gpus-per-trial auto: {plan.explanation}", flush=True)
    # The probe measured one GPU; Ray places fractional trials on every GPU, assumed alike.
    return GpuShare(plan.fraction, config.max_concurrent or plan.trials * gpus)


def resolve_gpus(requested: float, gpus: int) -> float:
    """A given --gpus-per-trial, refused where no GPU would take it."""
    if requested > 0 and not gpus:
        raise UsageError(
            f"--gpus-per-trial {requested} but no CUDA GPU is visible: pass --gpus-per-trial 0 to train on the CPU"
        )
    return requested


def trial_slots(gpus_per_trial: float, cpus_per_trial: int, gpus: int, cpus: int) -> int:
    """How many trials fit at once: GPU slots where trials take a GPU share, CPU cores otherwise."""
    if gpus_per_trial > 0:
        return max(1, int(gpus / gpus_per_trial + 1e-9))
    return max(1, cpus // cpus_per_trial)
