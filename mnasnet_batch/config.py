"""Typed job configuration: YAML profiles, ``--set section.key=value`` overrides, validation."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OUTPUT_MODES = ("auto", "incremental", "overwrite", "retry-errors", "changed", "relabel")
# The modes that replace the rows of any images (changed, relabel): only a table (output.table) holds one current
# row per image. A Parquet folder's retry-errors replaces its error rows in the parts that hold them.
TABLE_ONLY_MODES = ("changed", "relabel")
MODEL_NAMES = ("mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3")
DEVICES = ("auto", "cpu", "gpu")
DECODE_PLACES = ("workers", "actor")
PRECISIONS = ("fp32", "fp16", "bf16")
ENGINES = ("auto", "torch", "onnxruntime")
# HEIC / HEIF are read with the `heif` extra, and AVIF by a Pillow built with libavif; where they cannot be, the
# input listing counts their files and leaves them out (mnasnet_batch/decode/formats.py).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "avif", "heic", "heif")
INPUT_FORMATS = ("auto", "files", "webdataset", "parquet", "arrow", "manifest")
# Option names whose values are credentials: never logged or written (matched as substrings, lower case).
SECRET_NAMES = ("key", "secret", "token", "password", "credential", "sas", "sig", "connection_string")
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass(frozen=True)
class InputConfig:
    # Required: a local path or fsspec URI; there is no sensible corpus to default to.
    uri: str = ""
    # The image formats Pillow decodes that appear in web-scale corpora and photo libraries (phones save HEIC);
    # matched case-insensitively.
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    # auto: read the layout from what the URI holds (images, then *.tar shards, then *.parquet and *.arrow files
    # with a column of images, else a manifest); set it when a location holds more than one layout.
    format: str = "auto"
    # Parquet and Arrow input: the column of encoded images, binary or a struct with a bytes field (Hugging Face's
    # Image feature). "": the column named image or img, else the one column that can hold images.
    image_column: str = ""
    # Parquet and Arrow input: the column of ids (unique within a file) that a row's `uri` ends with, as FILE#ID.
    # "": the column named id where every file has one (the earlier default, so outputs written with it resume),
    # else the row's index within its file, stable for an unchanged file; Hugging Face datasets have no id column.
    id_column: str = ""
    # Parquet and Arrow input: only the files of this split (train in data/train-00000-of-00002.parquet or
    # train/data-00000-of-00001.arrow); "": every split of a dataset folder.
    split: str = ""
    # Columns of the input copied into every output row as they were (a Hugging Face dataset's label, an
    # img2dataset shard's url and key): Parquet and Arrow rows' columns (and split, the row's split), WebDataset
    # samples' .json keys and txt (the .txt member), CSV / TSV / Parquet manifests' columns. None by default: the
    # output holds the labels only.
    keep_columns: tuple[str, ...] = ()
    # CSV and Parquet manifests: the column of image URIs ("uri", like this job's own output).
    uri_column: str = "uri"


@dataclass(frozen=True)
class StorageConfig:
    # Empty: the provider's endpoint, or AWS_ENDPOINT_URL; set it for MinIO, moto, or other S3-compatible stores.
    endpoint_url: str = ""
    # False: sign requests with the standard credential chain (env, profile, instance role); true for public buckets.
    anonymous: bool = False
    # Empty: the region from AWS_REGION / the profile, which buckets in other regions redirect from anyway.
    region: str = ""
    # Extra fsspec options for every non-local filesystem (e.g. {"requester_pays": true}); options given
    # under a scheme name ({"s3": {...}, "gs": {...}}) apply to that scheme only. Credentials given here
    # are redacted from the written configuration.
    options: dict[str, object] = field(default_factory=dict)
    # The most bytes one image (a file, an object, a URL, a tar member) may have; a larger one is an error row,
    # refused from its size before it is read, or once this many bytes have come where the size is not known.
    # 512 MiB: a 45-Mpx camera's 16-bit TIFF (270 MB) fits with room, and 16-bit RGB uncompressed (6 bytes a
    # pixel) reaches preprocess.max_pixels near this size, so no image the pixel cap admits is refused for bytes;
    # a stray multi-GB file (a video, a disk image named *.jpg) never fills a worker's memory.
    max_image_bytes: int = 512 * 2**20
    # HTTP(S) reads: seconds to wait for a connection, and for each next piece of the answer, before the read is
    # an error row. 10 s: img2dataset's default; a server that sends nothing for 10 s rarely sends more, and
    # aiohttp's own default (300 s in all) held a whole batch for 5 minutes over one silent URL.
    http_timeout_s: float = 10.0
    # Image reads from object stores and HTTP(S): tries after the first for transient failures (a connection reset
    # or refused, a body cut short, 5xx, 429, S3's SlowDown; timeouts on object stores, not on HTTP), waiting about
    # 0.5 s, 1 s, 2 s with jitter, or the server's Retry-After. 3: rides out a server restarting or throttling for a
    # few seconds (a read that 30 % of tries fail still fails 4 in a row once in 120), while one that keeps failing
    # costs only itself ~3.5 s: the rest of its batch goes on without it. Then it is an error row that says so.
    read_retries: int = 3


@dataclass(frozen=True)
class OutputConfig:
    # Required: a directory or URI prefix that receives the Parquet files.
    uri: str = ""
    # 10,000 rows (~1 MB of Parquet) per file: few files for readers, and a run of minutes still
    # writes as it goes rather than only at the end.
    rows_per_file: int = 10_000
    # 300 (5 minutes): a run slower than rows_per_file rows per 5 minutes (a CPU node on large photos) closes a
    # smaller part this often, so a killed run loses at most that much labeling (a stopped one loses none) and
    # readers get at most 12 such parts an hour.
    part_interval_s: float = 300.0
    # auto: start a run, or resume the unfinished one; refuse an output that holds a finished run.
    # incremental: label only inputs with no row under the output yet. retry-errors: label again the images whose
    # row is an error, replacing those rows. overwrite: delete and start over. A table also: changed, relabel.
    mode: str = "auto"
    # Empty: the Ray job submission id when there is one, else a UTC timestamp.
    run_id: str = ""
    # Empty: the Parquet folder. "namespace.name": an Apache Iceberg table with one current row per image; the
    # runs stage their parts under output.uri and commit them to it (mnasnet_batch/outputs/table.py).
    table: str = ""
    # Empty: an embedded SQLite catalog under output.uri, which runs anywhere without a service. Otherwise passed
    # to pyiceberg's load_catalog (type: rest, glue, hive, sql; uri; warehouse; ...), "name" as its name.
    catalog: dict[str, object] = field(default_factory=dict)
    # 0: one commit when the run ends, so readers see a run whole or not at all. Seconds between commits on a
    # large corpus, so that readers see labels as they come (a killed run loses nothing either way: its parts stay
    # staged and the same command commits them).
    commit_interval_s: float = 0.0
    # False: a table that lacks a column of input.keep_columns (or holds it in a narrower type, int where the input
    # has long) is refused before anything is labeled, so that a typo in a column name does not change a shared
    # table's schema for every reader. True: the job adds the columns (nullable: earlier rows read null there) or
    # widens them as Iceberg allows (int to long, float to double); a type Iceberg cannot change to stays refused.
    evolve_schema: bool = False
    # 30: seconds between the renewals of the output's lease (_lease.json), a small read and write each. A job on
    # another machine that finds the lease unrenewed for 4 of them (2 minutes, watched on its own clock) takes the
    # output over: how long a killed job's output stays locked from another machine.
    lease_heartbeat_s: float = 30.0
    # False: an output whose bucket (S3, GCS) or container (Azure) does not exist stops the job before reading, so
    # that a typo in its name does not create a bucket in the account (s3fs' makedirs would). True: the job creates it.
    create_bucket: bool = False


@dataclass(frozen=True)
class ModelConfig:
    # mnasnet0_5: the smallest published variant (2.2 M params), fastest per image on CPU.
    name: str = "mnasnet0_5"
    # torchvision publishes one set of weights per MnasNet variant; a path or URI also works.
    weights: str = "IMAGENET1K_V1"
    # Empty: no pin beyond the hash prefix torchvision puts in its file names.
    sha256: str = ""
    # 5: the model card reports top-5 accuracy, so five classes carry the published quality.
    top_k: int = 5
    # True: fetch torchvision's weights into the torch hub cache when absent, as torchvision does.
    download: bool = True


@dataclass(frozen=True)
class PreprocessConfig:
    # 32 images (~0.12 s of decoding per task on one core, docs/benchmarks.md) keep task overhead under a few percent.
    batch_size: int = 32
    # Pillow's own decompression-bomb threshold (89.5 Mpx, ~ a 9500x9500 image): refused before decoding.
    max_pixels: int = 89_478_485
    # 0: derived when the job starts. The driver measures what an image of the input costs decoding and the model
    # (a sample of ~12 images, costs.measure), and on a cluster without GPUs the model actors hold the model's share
    # of the CPUs; decode tasks fill the rest, about one CPU each (Pillow decodes on one thread). 500-px JPEGs
    # cost about as much to decode as the model, a 12 MP photo 30x more (docs/benchmarks.md): no fixed value fits
    # both. Set it to insist on one (with compute.actor_cpus for the actors).
    num_cpus: float = 0.0
    # False: the reference pipeline (PIL open + transforms) ignores EXIF orientation, so predictions match it.
    apply_exif_orientation: bool = False
    # workers: Pillow on the CPU decode tasks, the reference's own code. actor: images travel as bytes and the
    # model actor decodes them: on a GPU, JPEGs in batches with nvJPEG and the same resize to the bit, for GPU
    # nodes whose CPUs cannot decode as fast as the GPU classifies; on a CPU, with Pillow on the actor's threads
    # (at par with workers on a 2-core machine, docs/benchmarks.md).
    decode_on: str = "workers"
    # False: decode every pixel, as the reference does, so predictions match it. True: a large JPEG is decoded at
    # libjpeg's DCT scale 1/2, 1/4 or 1/8 (Image.draft), whose short side stays at least twice the resize target
    # (512 px for Resize 256), then resized and cropped as before; other formats are decoded exactly (reducing them
    # after a full decode saved little and moved pixels 4.4x as far, docs/benchmarks.md). A phone photo (12 MP)
    # decodes several times faster; the crops differ from the reference's by a fraction of a grey level on average
    # (contract: under 1 level), which can move a prediction near a tie (measured in docs/benchmarks.md). Pillow's
    # paths only: nvJPEG on a GPU actor (decode_on=actor) stays exact.
    fast_decode: bool = False


@dataclass(frozen=True)
class ComputeConfig:
    # 64: fills a CPU core's vector units and a GPU's launch queue; 224x224x3 uint8 is 9.6 MB per batch.
    batch_size: int = 64
    # 0: the whole batch per forward pass on a GPU, runs of 8 on a CPU, which keep each layer's activations in the
    # core's caches, runs of 16 on ONNX Runtime (engine.CPU_MICRO_BATCH, engine.ONNXRUNTIME_MICRO_BATCH; measured
    # in docs/benchmarks.md).
    micro_batch: int = 0
    # auto: one GPU per model actor when the cluster has GPUs when the job starts, else CPU actors. Set gpu on
    # clusters whose GPU nodes autoscale from zero: at start they show no GPU, yet the actors must ask for one.
    device: str = "auto"
    # At least one model actor, so the job always makes progress.
    min_actors: int = 1
    # 0: derived from the cluster: one actor per GPU, else as many as fit in 3/4 of the CPUs.
    max_actors: int = 0
    # 0: start with min_actors and let Ray Data add actors while work queues up; more saves the ramp-up
    # (~10 s per actor start) on a large job. Never more than max_actors.
    initial_actors: int = 0
    # 0: derived: 1 with a GPU, else 3/4 of the cluster's CPUs, from 1 to 4; CPU actors run that many threads.
    actor_cpus: float = 0.0
    # Memory reserved per model actor: a mnasnet0_5 actor peaks at ~1.0 GB here (torch, model, a batch of 64);
    # 1.5 leaves room for mnasnet1_3 and larger batches.
    actor_memory_gb: float = 1.5
    # 0: fail at once when no node can hold a model actor (Ray would keep it pending forever). Set it where an
    # autoscaler adds nodes (GPU groups that scale from zero): the job asks for one actor's node and waits.
    node_wait_s: float = 0.0
    # 0: the CPUs of the nodes an autoscaler adds, as Ray's cluster config reports them (Ray 2.60's own autoscalers
    # do not report them; Anyscale's does), else the largest worker node alive. Set it to the worker group's CPUs
    # (KubeRay's CPU limit, the cluster launcher's node type) where the cluster may start with none.
    node_cpus: float = 0.0
    # 0: the most worker nodes an autoscaler adds, as Ray's cluster config reports them, else the workers alive (the
    # cluster is planned as it is; capacity.UNBOUNDED_NODES where the job had to ask for its first node). Set it to
    # the group's maxReplicas (KubeRay) or max_workers (cluster launcher): the actor pool's bound and the read
    # blocks are sized for the CPUs the cluster may reach.
    max_nodes: int = 0
    # GPUs per model actor on GPU clusters: 1. Below 1 (0.5, 0.25) packs several actors on a GPU, which one
    # actor alone cannot keep busy while it also decodes, copies and writes on the CPU.
    actor_gpus: float = 1.0
    # fp32: the reference's arithmetic. fp16/bf16 run the model under autocast, faster on a GPU, but scores move
    # (by how much on published weights is not measured yet; docs/gpu.md); fp16 needs a GPU.
    precision: str = "fp32"
    # What runs the model. auto: ONNX Runtime on CPU actors in fp32 where it is installed (the `onnx` extra), whose
    # CPU kernels label faster than torch's with the same top-k (docs/benchmarks.md), else torch; torch on GPUs.
    # torch, or onnxruntime (CPU actors, fp32 only), to insist on one.
    engine: str = "auto"


@dataclass(frozen=True)
class RayConfig:
    # Empty: start a local Ray in-process, unless RAY_ADDRESS names a cluster (as `ray job submit` sets).
    address: str = ""
    # 30 s: a head node that is starting (or a GCS that restarts) accepts connections within seconds; an address
    # nothing answers would otherwise leave the job waiting for minutes on Ray's own retries, with no line of its own.
    connect_timeout_s: float = 30.0


@dataclass(frozen=True)
class ProgressConfig:
    # 30 s: in job logs (no terminal) a 10-minute run reads as 20 lines, and a stall shows within a minute.
    # At a terminal a progress bar is redrawn every second instead.
    interval_s: float = 30.0
    # 600 s: no image labeled for that long means the job waits for something that will not come (decode tasks or
    # an actor no node left can place, a read that never answers): the run ends, failed and resumable, with a line
    # naming what waits. Far above a healthy job's longest pause: a lost node noticed and its actors restarted
    # (under a minute), a model actor's start, or a node an autoscaler adds (a few minutes; compute.node_wait_s
    # bounds the wait for the first).
    stall_s: float = 600.0


@dataclass(frozen=True)
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    progress: ProgressConfig = field(default_factory=ProgressConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def _section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(JobConfig)[f.name] for f in dataclasses.fields(JobConfig)}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_tuple(value: object) -> object:
    if isinstance(value, str):  # "a, b" from --set
        value = [part.strip() for part in value.split(",") if part.strip()]
    return tuple(value) if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) else None


def _as_dict(value: object) -> object:
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    return {} if value == "" else None


# Per annotated type, the value a setting takes, or None where it would lose something: no bool is a number, an
# int is a float, a number written where a name goes (a run id of digits) is that name.
_CONVERTERS = {
    bool: lambda v: v if isinstance(v, bool) else None,
    int: lambda v: v if isinstance(v, int) and not isinstance(v, bool) else None,
    float: lambda v: float(v) if _is_number(v) else None,
    str: lambda v: v if isinstance(v, str) else str(v) if _is_number(v) else None,
    tuple: _as_tuple,
    dict: _as_dict,
}


def _coerce(where: str, value: object, expected: object) -> object:
    """Checks ``value`` against a field's annotated type, converting only where it loses nothing."""
    convert = _CONVERTERS.get(typing.get_origin(expected) or expected)
    converted = None if convert is None else convert(value)
    if converted is None:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"{where}: expected {name}, got {value!r}")
    return converted


def _build(overrides: dict[str, dict[str, object]]) -> JobConfig:
    sections = {}
    for section_name, section_type in _section_types().items():
        values = overrides.get(section_name, {})
        hints = typing.get_type_hints(section_type)
        sections[section_name] = section_type(
            **{key: _coerce(f"{section_name}.{key}", value, hints[key]) for key, value in values.items()}
        )
    return JobConfig(**sections)


def _merge(into: dict[str, dict[str, object]], data: object, source: str) -> None:
    """Merges one YAML document or override into ``into``, rejecting unknown sections and keys."""
    section_types = _section_types()
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(section_types)})")
    for section_name, values in data.items():
        if section_name not in section_types:
            raise ConfigError(f"{source}: unknown section {section_name!r}; valid sections: {', '.join(section_types)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping of keys")
        valid = [f.name for f in dataclasses.fields(section_types[section_name])]
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(
                    f"{source}: unknown key {section_name}.{key}; valid keys in {section_name}: {', '.join(valid)}"
                )
            if isinstance(value, _Entries):
                if typing.get_origin(typing.get_type_hints(section_types[section_name])[key]) is not dict:
                    name = f"{section_name}.{key}"
                    raise ConfigError(f"{source}: {name} is not a mapping of keys; set it as {name}=value")
                value = _with_entries(into.get(section_name, {}).get(key, {}), value)
            into.setdefault(section_name, {})[key] = value


class _Entries(dict):
    """Keys set inside a mapping setting (``--set storage.options.key=value``): merged into the mapping, where a
    whole mapping (``--set "storage.options={key: ...}"``) replaces it."""


def parse_override(assignment: str) -> dict[str, dict[str, object]]:
    """Turns ``section.key=value`` into a nested mapping; the value is read as YAML (``3``, ``true``, ``a,b``).

    ``section.key.a.b=value`` sets key ``a.b`` inside the mapping setting ``section.key`` (``storage.options.key``,
    ``output.catalog.uri``), keeping its other keys.

    Raises:
        ConfigError: not ``section.key=value``, or a value that is not valid YAML (one line, no traceback).
    """
    path, sep, raw = assignment.partition("=")
    section, _, rest = path.strip().partition(".")
    key, *inner = rest.split(".")
    if not sep or not section or not key or not all(inner):
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, for example model.top_k=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {path.strip()}=...: the value is not valid YAML ({problem}); quote it") from None
    for name in reversed(inner):
        value = _Entries({name: value})
    return {section: {key: value}}


def _with_entries(mapping: object, entries: _Entries) -> object:
    """``mapping`` with ``entries`` set in it, key by key at every depth; a plain dict (not ``_Entries``)."""
    merged = dict(mapping) if isinstance(mapping, dict) else {}
    for name, value in entries.items():
        merged[name] = _with_entries(merged.get(name), value) if isinstance(value, _Entries) else value
    return merged


def load_config(path: str | Path | None = None, overrides: list[dict[str, dict[str, object]]] = ()) -> JobConfig:
    """Loads a YAML profile (or the defaults), applies overrides in order and validates the result.

    Args:
        path: a YAML file with the sections of ``JobConfig``; None uses the defaults.
        overrides: nested mappings applied after the file, later ones winning.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: an unknown section or key, a value of the wrong type, or a value out of range.
    """
    merged: dict[str, dict[str, object]] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        _merge(merged, data, str(path))
    for override in overrides:
        _merge(merged, override, "--set")
    config = _build(merged)
    validate(config)
    return config


def validate(config: JobConfig) -> None:
    """Rejects values that are of the right type but cannot work, naming the valid choices.

    Over 60 lines: one check per setting, in one list read top to bottom.
    """
    checks = [
        _one_of("model.name", config.model.name, MODEL_NAMES),
        (1 <= config.model.top_k <= 1000, f"model.top_k: {config.model.top_k} is not between 1 and 1000"),
        (bool(config.model.weights), "model.weights: empty; use IMAGENET1K_V1, a file path or a URI"),
        (
            config.model.sha256 == "" or _is_sha256(config.model.sha256),
            f"model.sha256: {config.model.sha256!r} is not 64 hexadecimal digits",
        ),
        (config.preprocess.batch_size >= 1, "preprocess.batch_size: must be at least 1"),
        (config.preprocess.max_pixels >= 1, "preprocess.max_pixels: must be at least 1"),
        (config.preprocess.num_cpus >= 0, "preprocess.num_cpus: must be 0 (derived) or more"),
        _one_of("output.mode", config.output.mode, OUTPUT_MODES),
        (
            all(c.isalnum() or c in "-_." for c in config.output.run_id),
            f"output.run_id: {config.output.run_id!r} may hold only letters, digits, '-', '_' and '.'",
        ),
        (config.output.rows_per_file >= 1, "output.rows_per_file: must be at least 1"),
        (config.output.part_interval_s > 0, "output.part_interval_s: must be more than 0 seconds"),
        (
            not config.output.table
            or all(part for part in config.output.table.split("."))
            and "." in config.output.table,
            f"output.table: {config.output.table!r} is not namespace.name (e.g. labels.images)",
        ),
        (config.output.lease_heartbeat_s > 0, "output.lease_heartbeat_s: must be more than 0 seconds"),
        (config.output.commit_interval_s >= 0, "output.commit_interval_s: must be 0 (commit at the end) or more"),
        (config.compute.batch_size >= 1, "compute.batch_size: must be at least 1"),
        (config.compute.micro_batch >= 0, "compute.micro_batch: must be 0 (derived) or at least 1"),
        (config.compute.min_actors >= 1, "compute.min_actors: must be at least 1"),
        (
            config.compute.max_actors == 0 or config.compute.max_actors >= config.compute.min_actors,
            "compute.max_actors: must be 0 (derived) or at least compute.min_actors",
        ),
        _one_of("compute.device", config.compute.device, DEVICES),
        (
            config.compute.initial_actors == 0 or config.compute.initial_actors >= config.compute.min_actors,
            "compute.initial_actors: must be 0 (min_actors) or at least compute.min_actors",
        ),
        (
            config.compute.max_actors == 0 or config.compute.initial_actors <= config.compute.max_actors,
            "compute.initial_actors: must be at most compute.max_actors",
        ),
        _one_of("preprocess.decode_on", config.preprocess.decode_on, DECODE_PLACES),
        _one_of("compute.precision", config.compute.precision, PRECISIONS),
        (
            not (config.compute.precision == "fp16" and config.compute.device == "cpu"),
            "compute.precision: fp16 needs GPU actors (compute.device=cpu); use bf16 or fp32 on CPU",
        ),
        _one_of("compute.engine", config.compute.engine, ENGINES),
        (
            not (config.compute.engine == "onnxruntime" and config.compute.device == "gpu"),
            "compute.engine: onnxruntime runs the model on CPU actors (compute.device=gpu); use auto or torch on GPUs",
        ),
        (
            not (config.compute.engine == "onnxruntime" and config.compute.precision != "fp32"),
            f"compute.engine: onnxruntime runs fp32 only (compute.precision={config.compute.precision}); use torch",
        ),
        (config.progress.interval_s > 0, "progress.interval_s: must be more than 0"),
        (config.progress.stall_s > 0, "progress.stall_s: must be more than 0 seconds"),
        (config.ray.connect_timeout_s > 0, "ray.connect_timeout_s: must be more than 0"),
        (config.storage.max_image_bytes >= 1, "storage.max_image_bytes: must be at least 1"),
        (config.storage.http_timeout_s > 0, "storage.http_timeout_s: must be more than 0"),
        (config.storage.read_retries >= 0, "storage.read_retries: must be 0 (no retries) or more"),
        (config.compute.actor_memory_gb > 0, "compute.actor_memory_gb: must be more than 0"),
        (config.compute.actor_cpus >= 0, "compute.actor_cpus: must be 0 (derived) or more"),
        (config.compute.node_wait_s >= 0, "compute.node_wait_s: must be 0 (do not wait) or more"),
        (config.compute.node_cpus >= 0, "compute.node_cpus: must be 0 (from the cluster) or more"),
        (config.compute.max_nodes >= 0, "compute.max_nodes: must be 0 (from the cluster) or more"),
        (
            0 < config.compute.actor_gpus <= 1 or config.compute.actor_gpus == int(config.compute.actor_gpus) > 0,
            "compute.actor_gpus: must be a fraction in (0, 1] or a whole number of GPUs",
        ),
    ]
    checks.append(_one_of("input.format", config.input.format, INPUT_FORMATS))
    checks.append((bool(config.input.uri_column), "input.uri_column: empty; name a column"))
    checks.append((all(config.input.keep_columns), "input.keep_columns: an empty name; list the columns to keep"))
    unknown_ext = [e for e in config.input.extensions if e.lower().lstrip(".") not in IMAGE_EXTENSIONS]
    checks.append(
        (not unknown_ext, f"input.extensions: {unknown_ext} not supported; valid: {', '.join(IMAGE_EXTENSIONS)}")
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> tuple[bool, str]:
    """A validation check that ``value`` is one of ``choices``, with the message naming them."""
    return value in choices, f"{key}: {value!r} is not one of {', '.join(choices)}"


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower())


def is_secret_name(name: str) -> bool:
    """Whether an option with this name holds a credential (``key``, ``secret``, ``token``, ...)."""
    return any(part in name.lower() for part in SECRET_NAMES)


def redact(value: object) -> object:
    """Replaces credentials in nested option mappings, and passwords in URLs, with ``<redacted>``."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_name(str(k)) and v not in (None, "") else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = value.split("://", 1)
        return f"{scheme}://{REDACTED}@{rest.split('@', 1)[1]}"
    return value


def to_dict(config: JobConfig) -> dict[str, dict[str, object]]:
    """The configuration as plain YAML-ready data (tuples become lists), with credentials redacted."""
    return {
        name: {k: list(v) if isinstance(v, tuple) else redact(v) for k, v in values.items()}
        for name, values in dataclasses.asdict(config).items()
    }


# What `pip install` needs for compute.engine=onnxruntime (pyproject.toml's extra). The check lives here, not with
# the engines, so that it needs no torch and comes before the input is listed.
ONNXRUNTIME_EXTRA = "mnasnet-batch[onnx]"


def onnxruntime_installed() -> bool:
    """Whether the ``onnx`` extra is installed: ONNX Runtime, and onnx, which torch's exporter writes the graph with."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require_installed(engine: str) -> None:
    """Stops a job that asks for ONNX Runtime where it is not installed, before anything is read.

    Raises:
        ConfigError: ``engine`` is ``onnxruntime`` and the package is missing.
    """
    if engine == "onnxruntime" and not onnxruntime_installed():
        raise ConfigError(
            f"compute.engine=onnxruntime: ONNX Runtime is not installed (or onnx, which exports the model); "
            f"pip install '{ONNXRUNTIME_EXTRA}'"
        )
