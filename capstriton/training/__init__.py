"""Training: the loop every training script uses (``Loop``), its batch sources, the training
step and validation pass, process groups (``torchrun``), mixed precision and CUDA graphs,
checkpoints and exact resume, metrics files and progress lines, the start-up kernel check,
recipes, and the command-line pieces the scripts share."""
from .batches import (
    DrawnBatches,
    ShuffledBatches,
    augmented_input,
    check_labels,
    load_classification_data,
    random_shift,
    shift_images,
    shift_offsets,
)
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer_state,
    previous_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    write_checkpoint,
)
from .cli import add_run_flags, check_backend, require_positive, resolve_device, run_cli
from .distributed import Distributed, init_distributed
from .logging import (
    MetricsFiles,
    Progress,
    plot_metrics,
    save_reconstructions,
    tensorboard_writer,
    write_json,
    write_metrics_csv,
    write_text,
)
from .loop import EarlyStopping, Loop
from .precision import AMP_DTYPES, CudaGraphStep, autocast, check_cuda_graphs, grad_scaler
from .recipes import (
    AFFINE_CPU_DEMO,
    AFFINE_FULL,
    CAPSNET_CPU_DEMO,
    CAPSNET_PAPER,
    EFFICIENT_CAPSNET_CPU_DEMO,
    EFFICIENT_CAPSNET_RECIPE,
    MNIST_RECIPES,
    MODEL_ROUTING,
    MULTIMNIST_CPU_DEMO,
    MULTIMNIST_FULL,
    build_mnist_model,
    checkpoint_model_mismatch,
    mnist_routing,
)
from .schedule import learning_rate, paper_lr, set_lr
from .selfcheck import capsule_shapes, choose_backend, triton_self_check
from .steps import capsule_loss, evaluate, make_optimizer, make_step, make_train_step

__all__ = [
    "Loop", "EarlyStopping", "ShuffledBatches", "DrawnBatches", "augmented_input", "random_shift", "shift_images",
    "shift_offsets", "check_labels", "load_classification_data", "make_step", "make_train_step", "capsule_loss",
    "make_optimizer", "evaluate", "learning_rate", "paper_lr", "set_lr", "Distributed", "init_distributed",
    "AMP_DTYPES", "autocast", "grad_scaler", "check_cuda_graphs", "CudaGraphStep", "save_checkpoint",
    "load_checkpoint", "write_checkpoint", "previous_checkpoint", "CheckpointError", "rng_state",
    "restore_rng_state", "load_optimizer_state", "Progress",
    "MetricsFiles", "write_metrics_csv", "plot_metrics", "write_json", "write_text", "save_reconstructions",
    "tensorboard_writer", "triton_self_check", "capsule_shapes", "choose_backend", "add_run_flags",
    "require_positive", "resolve_device", "check_backend", "run_cli", "CAPSNET_PAPER", "CAPSNET_CPU_DEMO",
    "EFFICIENT_CAPSNET_RECIPE", "MODEL_ROUTING", "build_mnist_model", "checkpoint_model_mismatch",
    "mnist_routing", "EFFICIENT_CAPSNET_CPU_DEMO", "MNIST_RECIPES", "AFFINE_FULL", "AFFINE_CPU_DEMO",
    "MULTIMNIST_FULL", "MULTIMNIST_CPU_DEMO",
]
