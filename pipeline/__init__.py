"""NER fine-tuning for PaddlePaddle encoders, in four steps (as PaddleHub's demo reads):

    import pipeline
    config = pipeline.TrainConfig(model="m3e-small", dataset="msra_ner", epochs=1)
    data = pipeline.load_dataset(config)                              # 1. load a data set
    model, tokenizer = pipeline.load_model(config.model, data.labels) # 2. choose a model
    result = pipeline.Trainer(config, model, tokenizer, data).fit()   # 3. optimiser + trainer (from config)
    predictor = pipeline.Predictor.from_checkpoint(f"{config.checkpoint_dir}/best_model")
    predictor.predict(["李华在北京大学读书。"])                          # 4. predict

Attributes are imported on first use, so ``import pipeline`` does not load
Paddle: the entry points set CPU thread variables first (see cpu_env).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "pipeline.config",
    "load_config": "pipeline.config",
    "load_dataset": "pipeline.api",
    "load_model": "pipeline.api",
    "Trainer": "pipeline.trainer",
    "Predictor": "pipeline.predictor",
    "ParallelPredictor": "pipeline.predict_workers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
