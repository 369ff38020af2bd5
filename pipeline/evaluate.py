"""Evaluation command line: a saved checkpoint on a labelled file, with the training code's own evaluation.

    python -m pipeline.evaluate --checkpoint outputs/msra_full/best_model \\
        --file ~/.cache/nerpipe/data/msra_ner/test.tsv --predictions test_predictions.jsonl --report test_errors

Prints entity-level precision, recall and F1 (overall and per type; conlleval-style under the plain keys,
strict IOB2 under ``strict_`` keys) as JSON; the
numbers are those ``train_dist.py`` reports for the same model and file, since
both run ``pipeline.evaluation.evaluate`` (the library) over the same ``TokenLabeller``.
``--report DIR`` also writes the error analysis of ``pipeline.error_analysis`` there (JSON, markdown, PNG).
``--decoding argmax|constrained`` overrides the decoding the checkpoint records, to
compare the two on one model.
This module only wires the reader, the predictor and those functions together.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import DATA_FORMATS, TAG_SCHEMES
from .device import DeviceError, add_device_arguments, prepare_process, use_gpu_of
from .decoding import DECODINGS
from .prediction_io import output_problem
from .predictor import ALL_PRECISIONS, ENGINES, EngineUnavailable, Predictor, precision_problem


def build_parser() -> argparse.ArgumentParser:
    """The evaluation CLI's flags; the choice lists belong to the config and the predictor."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best_model/ directory written by train_dist.py")
    parser.add_argument("--file", required=True, help="labelled .tsv, .conll/.txt or .jsonl file")
    parser.add_argument("--data_format", default="auto", choices=DATA_FORMATS)
    parser.add_argument("--tag_scheme", default="auto", choices=TAG_SCHEMES)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_examples", type=int, default=0, help="only the first N sentences (0: all)")
    parser.add_argument("--predictions", help="also write every sentence's tokens, gold and predicted labels here")
    parser.add_argument("--engine", default="dynamic", choices=ENGINES)
    parser.add_argument("--precision", default=None, choices=ALL_PRECISIONS,
                        help="as predict.py's (e.g. --engine onnx --precision int8 scores the int8 export)")
    add_device_arguments(parser)
    parser.add_argument("--report", metavar="DIR", help="also write scores per type, entity errors by kind, the "
                        "most frequent mistakes with a sentence each (JSON and markdown) and a PNG into DIR")
    parser.add_argument("--decoding", default=None, choices=DECODINGS,
                        help="override the decoding the checkpoint records (constrained: valid BIO; argmax)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = args.predictions and output_problem(args.file, args.predictions, "--predictions")
    if not problem and args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        problem = f"--report {args.report} is a file; give a directory (created if missing)"
    if problem:  # before anything is read: the labelled file must never be overwritten
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        device = prepare_process(use_gpu_of(args))  # before Paddle is imported; CPU settings only on CPU
    except (DeviceError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .readers import DataError, check_labels, read_examples
    from .error_analysis import analyse, write_report
    from .evaluation import evaluate, write_predictions
    from .runtime import set_device
    from .labels import entity_types

    try:
        device = set_device(device)
        problem = precision_problem(args.precision, device.kind, args.engine)
        if problem:
            raise DeviceError(problem)
        examples, _ = read_examples(args.file, args.data_format, args.tag_scheme)
        predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=args.batch_size, engine=args.engine,
                                              use_gpu=device.is_gpu, decoding=args.decoding, precision=args.precision)
        labeller = predictor.labeller
        check_labels(examples, labeller.labels)
    except (DeviceError, DataError, CheckpointError, EngineUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.max_examples:
        examples = examples[: args.max_examples]
    counts, predictions = evaluate(labeller, examples, description=Path(args.file).name, keep_predictions=True)
    summary = counts.summary()
    if args.predictions:
        write_predictions(args.predictions, examples, predictions)
    if args.report:
        separator = " " if predictor.text_unit == "word" else ""
        analysis = analyse(examples, predictions, entity_types(labeller.labels), separator)
        written = write_report(args.report, analysis, f"{args.file} ({len(examples)} sentences)")
        print(f"error analysis: {', '.join(map(str, written))}", file=sys.stderr)
    print(json.dumps({"checkpoint": args.checkpoint, "file": args.file, "sentences": len(examples),
                      "decoding": labeller.decoding, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
