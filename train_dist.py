"""Fine-tune an encoder for NER: data-parallel, AMP, best model on dev, test at the end.

    python train_dist.py --config configs/msra_m3e_small_quick.yaml [key=value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 train_dist.py --config ...   # CPU workers
    python -m paddle.distributed.launch --gpus 0,1 train_dist.py --config ...   # GPU workers (use_gpu=auto)
    python train_dist.py --config configs/msra_m3e_small_quick.yaml --get checkpoint_dir   # one resolved value

Exit codes: 0 done; 2 bad config, data or checkpoint_dir (a relaunch would fail the same way); 3 too many
NaN/Inf steps in a row; 75 stopped by SIGTERM, SIGINT or SIGUSR1 after writing a training state (relaunch
the same command to continue: pipeline/stop_signals.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError, field_docs, load_config
from pipeline.device import DeviceError, prepare_process

logger = logging.getLogger("train_dist")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. epochs=2")
    parser.add_argument("--list-keys", action="store_true", help="print every config key with its meaning")
    parser.add_argument("--get", metavar="KEY", choices=list(field_docs()),
                        help="print KEY's value in the resolved config (file + overrides) and exit, without training")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_keys:
        for key, doc in field_docs().items():
            print(f"{key:24} {doc}")
        return 0
    try:
        config = load_config(args.config, args.overrides)  # before Paddle loads: bad configs fail in a second
        if args.get:
            print(getattr(config, args.get))
            return 0
        # Must precede the first `import paddle`: CPU settings only on CPU; refuses a bad NERPIPE_MALLOC.
        device = prepare_process(config.use_gpu)
    except (ConfigError, DeviceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from pipeline import dist
    from pipeline.asset_cache import AssetError
    from pipeline.checkpoint import CheckpointError, TrainingStatesDifferError, weights_digest
    from pipeline.metrics import SCORE_KEYS
    from pipeline.models import (ModelUnavailableError, build_token_classifier, build_tokenizer,
                                 check_max_seq_len_fits, check_weights_available, resolve_model)
    from pipeline.readers import DataError
    from pipeline.rundir import claim_checkpoint_dir
    from pipeline.runtime import (check_amp_on_device, current_device, set_deterministic, set_device, set_seed,
                                  setup_logging)
    from pipeline.splits import load_splits
    from pipeline.stop_signals import RELAUNCH_EXIT_CODE, ignore_stop_signals
    from pipeline.trainer import BEST_MODEL_DIR, NumericalError, Trainer, TrainingInterrupted

    lock = None
    try:
        device = set_device(device)
        dist.init_distributed(on_gpu=device.is_gpu)
        setup_logging()
        logger.info("device: %s (%s)", current_device(), device.reason)
        check_amp_on_device(config.amp)
        if config.deterministic:
            logger.info("deterministic kernels: %s", set_deterministic() or "no flags to set on CPU")
        # One run per checkpoint_dir, and no previous results overwritten unasked (see pipeline/rundir.py).
        lock = claim_checkpoint_dir(config)
        # Data and model availability are checked before anything slow (tokenising, building the model).
        splits = load_splits(config)
        spec = resolve_model(config.model)
        check_weights_available(spec)
        check_max_seq_len_fits(spec, config.max_seq_len)
    except (DataError, ModelUnavailableError, AssetError, ValueError, RuntimeError) as error:
        if lock is not None:
            lock.release()
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        set_seed(config.seed)  # same seed on every rank: identical head initialisation
        tokenizer = build_tokenizer(spec, config.lower_case)
        model = build_token_classifier(spec, splits.labels, config.head)
        # Dropout should differ between ranks, as their batches do.
        set_seed(config.seed + dist.get_rank())
        trainer = Trainer(config, model, tokenizer, splits)
        result = trainer.fit()
    except NumericalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except TrainingInterrupted as error:  # a stop signal: the state of the step every rank stopped after is written
        ignore_stop_signals()  # the launcher signals the workers still alive once one exits: keep this exit code
        print(error, file=sys.stderr, flush=True)
        dist.shutdown()  # then `finally` releases the lock
        return RELAUNCH_EXIT_CODE
    except CheckpointError as error:  # a state that cannot be resumed or written: a relaunch would meet it again
        print(f"error: {error}", file=sys.stderr, flush=True)
        if isinstance(error, TrainingStatesDifferError):
            # Every rank stops here together: leave together too. Rank 0 hosts the rendezvous store, and
            # exiting while a peer still holds a connection to it can abort the process (exit -6, not 2).
            dist.shutdown()
        return 2
    finally:
        if lock is not None:
            lock.release()
    # Every rank prints a digest of the weights it ends with: replicas that drifted apart show at once.
    print(f"[rank {dist.get_rank()}] final weights sha256 {weights_digest(trainer.model)}", flush=True)
    if dist.is_main_process():
        print(json.dumps({"global_step": result.global_step, "best_dev": result.best_dev and {
            k: result.best_dev[k] for k in SCORE_KEYS},
            "test": result.test and {k: result.test[k] for k in SCORE_KEYS},
            "best_model": f"{config.checkpoint_dir}/{BEST_MODEL_DIR}"}))
    dist.shutdown()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: a half-written file is dropped on the way out (pipeline/files.py)
        print("error: interrupted (Ctrl-C); rerun the same command to resume from the newest training state "
              "(checkpoint_dir/checkpoints, written every save_interval steps)", file=sys.stderr)
        sys.exit(130)
