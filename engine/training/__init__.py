"""Distributed training of grainflow's models on Ray Train (DDP; gloo on CPU, NCCL on GPU).

    from engine.training import train
    result = train("fusion", "fusion_tiny", archive, storage_path="runs/", epochs=3, num_workers=2)

Modules: `trainer` (the `train` entry point and TrainResult), `loop` (what each worker
runs), `schedule` (the learning rate per step), `tasks` (per-family loss and metrics),
`collate` (per-epoch augmentation and tensors), `checkpointing` (checkpoint directory
layout), `mlflow_metrics` (metrics on MLflow). Samples come from engine.data
(sample_plan, training_samples). YOLO detectors train through Ultralytics' own trainer
instead (engine.training.detector).
"""

from engine.training.trainer import TrainingError, TrainResult, plan_training, train

__all__ = ["TrainResult", "TrainingError", "plan_training", "train"]
