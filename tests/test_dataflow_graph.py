"""The job Dataflow would receive, built offline with DataflowRunner's dry run; and the template.

Why: what breaks a Dataflow launch (a transform runner v2 cannot take, options that turn a
streaming job into a batch one, a setup.py whose sdist lacks our code, the wrong worker image)
only shows at submission, which no local runner exercises. ``--dry_run=True`` (TestOptions) runs
everything DataflowRunner does before calling the service: overrides, the portable proto, the
runner v2 experiments, building the sdist and listing the artifacts to stage. It returns the job
instead of submitting it, with no credentials and no network (Beam skips its GCS checks then).

What a dry run exposes: ``result.job.proto`` is the Dataflow Job message as the client fills it
before staging (name, type). Its environment and the staged pipeline's URL are only added by
``create_job_description``, which uploads to GCS; and runner v2 never lists steps in the Job
message, it stages the portable pipeline as a file. So the transforms, the worker image and the
artifacts are read from that portable pipeline, ``result.job.proto_pipeline``.

The last tests check that the Flex Template's parameters (deploy/dataflow/metadata.json) are
exactly flags ``bms run`` takes, and the small launcher and worker entry points.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import DebugOptions, TestOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.runner import PipelineResult, PipelineState

from pipeline import pipeline as bms_pipeline
from pipeline.cli import build_parser
from pipeline.commands.run import parse_run_args, pipeline_options
from pipeline.errors import UsageError
from pipeline.io.hubs.positions import StartPosition
from pipeline.io.hubs.source import POSITIONS
from pipeline.io.warehouses import synapse
from pipeline.options import BmsOptions
from pipeline.schema import BOOKING_HUB, PAYMENT_HUB

pytest.importorskip(
    "apache_beam.runners.dataflow.internal.apiclient",
    reason="DataflowRunner needs apache-beam[gcp] (google-cloud-dataflow-client, google-auth...)",
)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "dataflow"

HUB = "eventhubs://bms-events.servicebus.windows.net?consumer_group=bms"
WAREHOUSE = "mssql+pyodbc://bms-synapse.sql.azuresynapse.net/bmspool"
CHECKPOINTS = "https://bmscheckpoints.blob.core.windows.net/bms-checkpoints"
WORKER_IMAGE = "europe-west1-docker.pkg.dev/bms-test/bms/worker:test"
DATAFLOW_ARGS = [
    "--runner=DataflowRunner",
    "--project=bms-test",
    "--region=europe-west1",
    "--temp_location=gs://bms-test/tmp",
    f"--setup_file={REPO / 'setup.py'}",
    "--dry_run=True",
]

WORKFLOW_TARBALL = "workflow.tar.gz"  # the name Beam stages the setup.py sdist under
SPLITTABLE_DOFN = common_urns.requirements.REQUIRES_SPLITTABLE_DOFN.urn
PARDO = common_urns.primitives.PAR_DO.urn
BOUNDED = beam_runner_api_pb2.IsBounded.BOUNDED
UNBOUNDED = beam_runner_api_pb2.IsBounded.UNBOUNDED


def dry_run(argv: list[str], scratch: Path) -> PipelineResult:
    """``bms run ARGV`` up to the Dataflow API call: the options ``bms run`` builds, our graph,
    and DataflowRunner in dry-run mode. Beam's scratch files (the sdist...) go to ``scratch``."""
    try:
        synapse.require_pyodbc()
    except UsageError as error:
        pytest.skip(f"building the Synapse writer needs pyodbc and unixODBC: {error}")
    options = pipeline_options(parse_run_args(argv))
    assert options.view_as(TestOptions).dry_run, "never submit a job from the tests"
    pipeline = beam.Pipeline(options=options)
    bms_pipeline.build(pipeline, options.view_as(BmsOptions))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))  # the stdlib's, not Beam's
        return pipeline.run()


@pytest.fixture(scope="module")
def streaming_job(tmp_path_factory: pytest.TempPathFactory) -> PipelineResult:
    """The production shape: unbounded, Event Hubs -> Synapse, checkpoints, our worker image."""
    argv = ["--hub", HUB, "--warehouse", WAREHOUSE, "--checkpoints", CHECKPOINTS]
    argv += [*DATAFLOW_ARGS, "--streaming", f"--sdk_container_image={WORKER_IMAGE}"]
    return dry_run(argv, tmp_path_factory.mktemp("streaming"))


@pytest.fixture(scope="module")
def batch_job(tmp_path_factory: pytest.TempPathFactory) -> PipelineResult:
    """``bms run --bounded`` on Dataflow."""
    argv = ["--bounded", "--hub", HUB, "--warehouse", WAREHOUSE, *DATAFLOW_ARGS]
    argv.append(f"--sdk_container_image={WORKER_IMAGE}")
    return dry_run(argv, tmp_path_factory.mktemp("batch"))


def test_a_synapse_job_on_dataflow_without_the_worker_image_is_refused() -> None:
    # Dataflow's default image has no ODBC driver: the job would fail on its first batch.
    argv = ["--bounded", "--hub", HUB, "--warehouse", WAREHOUSE, *DATAFLOW_ARGS]
    with pytest.raises(UsageError, match="--sdk_container_image"):
        pipeline_options(parse_run_args(argv))


@pytest.fixture(params=["streaming_job", "batch_job"])
def job(request: pytest.FixtureRequest) -> PipelineResult:
    return request.getfixturevalue(request.param)


def transforms(result: PipelineResult) -> dict[str, beam_runner_api_pb2.PTransform]:
    return {t.unique_name: t for t in result.job.proto_pipeline.components.transforms.values()}


def staged_files(environment: beam_runner_api_pb2.Environment) -> dict[str, str]:
    """{name staged as: local file} of an environment's artifacts."""
    files = {}
    for artifact in environment.dependencies:
        assert artifact.type_urn == common_urns.artifact_types.FILE.urn
        assert artifact.role_urn == common_urns.artifact_roles.STAGING_TO.urn
        role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload)
        path = beam_runner_api_pb2.ArtifactFilePayload.FromString(artifact.type_payload).path
        files[role.staged_name] = path
    return files


def test_unbounded_run_is_a_streaming_job_on_runner_v2(streaming_job: PipelineResult) -> None:
    assert streaming_job.state == PipelineState.DONE  # what a dry run returns, not a job state
    assert streaming_job.job.proto.type_.name == "JOB_TYPE_STREAMING"
    experiments = streaming_job.job.options.view_as(DebugOptions).experiments
    assert {"use_runner_v2", "enable_streaming_engine"} <= set(experiments)


def test_bounded_run_is_a_batch_job(batch_job: PipelineResult) -> None:
    assert batch_job.job.proto.type_.name == "JOB_TYPE_BATCH"
    assert "enable_streaming_engine" not in batch_job.job.options.view_as(DebugOptions).experiments


def test_job_holds_our_transforms(job: PipelineResult) -> None:
    names = set(transforms(job))
    for hub in (BOOKING_HUB, PAYMENT_HUB):
        assert {f"Read {hub}/ListPartitions", f"Read {hub}/ReadPartitions"} <= names
    assert {"ComputeFacts/Join", "WriteFacts", "WriteDeadLetters"} <= names
    assert any(name.startswith("WriteFacts/WriteRows/") for name in names)


def test_checkpointed_job_commits_positions(streaming_job: PipelineResult) -> None:
    assert "CommitPositions" in transforms(streaming_job)


def test_hub_reads_are_splittable_and_unbounded_only_when_streaming(
    streaming_job: PipelineResult, batch_job: PipelineResult
) -> None:
    """Dataflow checkpoints, splits and drains (``truncate``) a read only through the SDF; the
    events it reads must be unbounded when streaming, bounded in batch.

    Only the events output is checked: Beam gives the tagged outputs of a ParDo the boundedness
    of its inputs, ignoring ``unbounded_per_element``, so the positions output says bounded even
    in the streaming job."""
    for result, bounded in ((streaming_job, False), (batch_job, True)):
        pipeline_proto = result.job.proto_pipeline
        assert SPLITTABLE_DOFN in pipeline_proto.requirements
        for hub in (BOOKING_HUB, PAYMENT_HUB):
            [read] = [
                transform
                for name, transform in transforms(result).items()
                if name.startswith(f"Read {hub}/ReadPartitions/") and transform.spec.urn == PARDO
            ]
            payload = beam_runner_api_pb2.ParDoPayload.FromString(read.spec.payload)
            assert payload.restriction_coder_id, "ReadPartitions is not a splittable DoFn"
            [events] = [
                pipeline_proto.components.pcollections[pcollection]
                for tag, pcollection in read.outputs.items()
                if tag != POSITIONS
            ]
            assert events.is_bounded == (BOUNDED if bounded else UNBOUNDED)


@pytest.mark.parametrize(
    "fixture, image", [("streaming_job", WORKER_IMAGE), ("batch_job", WORKER_IMAGE)]
)
def test_workers_run_the_image_and_get_our_package(
    request: pytest.FixtureRequest, fixture: str, image: str
) -> None:
    """Every DoFn of ours runs in a Docker environment of the expected image that stages the
    sdist of setup.py, and that sdist holds the pipeline and producers packages."""
    result = request.getfixturevalue(fixture)
    environments = result.job.proto_pipeline.components.environments
    used = {t.environment_id for t in transforms(result).values() if t.spec.urn == PARDO}
    assert used and used <= set(environments)
    for environment_id in used:
        environment = environments[environment_id]
        assert environment.urn == common_urns.environments.DOCKER.urn
        docker = beam_runner_api_pb2.DockerPayload.FromString(environment.payload)
        assert docker.container_image == image
        files = staged_files(environment)
        assert WORKFLOW_TARBALL in files, f"setup.py not staged: {sorted(files)}"
    with tarfile.open(files[WORKFLOW_TARBALL]) as sdist:
        members = {name.split("/", 1)[-1] for name in sdist.getnames()}
    assert {
        "setup.py",
        "pipeline/pipeline.py",
        "pipeline/io/hubs/source.py",
        "pipeline/io/warehouses/synapse.py",
        "producers/events.py",
    } <= members


# The Flex Template: metadata.json, the launcher and the worker entry point.

METADATA = json.loads((DEPLOY / "metadata.json").read_text())
PARAMETERS = {parameter["name"]: parameter for parameter in METADATA["parameters"]}

#: A valid value for each template parameter, and what ``bms run`` makes of it.
EXAMPLES = {
    "hub": (HUB, HUB),
    "warehouse": (WAREHOUSE, WAREHOUSE),
    "start": ("2026-02-08T10:00:00Z", StartPosition.parse("2026-02-08T10:00:00Z")),
    "window_period": ("30", 30.0),
    "write_batch_size": ("500", 500),
    "checkpoints": (CHECKPOINTS, CHECKPOINTS),
    "event_time": ("payload", "payload"),
    "late_arrival_tolerance": ("60", 60.0),
}


def matches(parameter: str, value: str) -> bool:
    return all(re.fullmatch(regex, value) for regex in PARAMETERS[parameter].get("regexes", []))


def test_template_parameters_are_described() -> None:
    assert METADATA["name"] and METADATA["description"]
    assert set(PARAMETERS) == set(EXAMPLES)
    for name, parameter in PARAMETERS.items():
        assert parameter["label"] and parameter["helpText"], name
        assert parameter.get("isOptional", False) is (name not in ("hub", "warehouse")), name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_template_parameter_is_a_bms_run_flag(name: str) -> None:
    """The launcher passes each parameter as ``--name=value``: ``bms run`` must take it as its
    own flag. An unknown one would silently go to Beam (``beam_args``), and be ignored."""
    value, parsed = EXAMPLES[name]
    assert matches(name, value), f"{name}: the template's regexes refuse {value!r}"
    args = parse_run_args([f"--{name}={value}"])
    assert args.beam_args == [], f"bms run does not know --{name}"
    assert getattr(args, name) == parsed


@pytest.mark.parametrize(
    "name, value",
    [
        ("warehouse", "mssql+pyodbc://bms:s3cret@bms-synapse.sql.azuresynapse.net/bmspool"),
        ("warehouse", "Driver={ODBC Driver 18 for SQL Server};Server=x;PWD=s3cret"),
        ("hub", "eventhubs://"),  # the launcher has no connection string to find the namespace
        ("hub", "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKey=s3cret"),
        ("checkpoints", "/tmp/checkpoints"),  # a worker's local disk
        ("start", "yesterday"),
        ("write_batch_size", "0"),
    ],
)
def test_template_refuses_secrets_and_worker_local_paths(name: str, value: str) -> None:
    assert not matches(name, value)


@pytest.mark.parametrize(
    "start", ["earliest", "latest", "2026-02-08", "2026-02-08T10:00:00.5+01:00", "0:120,1:97"]
)
def test_template_start_regex_follows_bms_run(start: str) -> None:
    assert matches("start", start)
    assert parse_run_args([f"--start={start}"]).start == StartPosition.parse(start)


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_passes_parameters_to_bms_run_on_dataflow() -> None:
    launcher = load(DEPLOY / "main.py")
    argv = launcher.bms_run_argv([f"--hub={HUB}", "--project=bms-test", "--region=europe-west1"])
    args, beam_args = build_parser().parse_known_args(argv)
    assert args.command == "run" and args.hub == HUB
    assert beam_args == ["--runner=DataflowRunner", "--project=bms-test", "--region=europe-west1"]
    given = ["--runner", "DataflowRunner", f"--hub={HUB}"]
    assert launcher.bms_run_argv(given) == ["run", *given]


def test_worker_entrypoint_reads_secret_names_only_in_the_documented_form() -> None:
    entrypoint = load(DEPLOY / "worker_entrypoint.py")
    version = "projects/bms-test/secrets/eventhub-connection/versions/latest"
    spec = f"EVENTHUB_CONNECTION_STRING={version}  SYNAPSE_PASSWORD={version[:-6]}3,"
    assert entrypoint.secret_versions(spec) == {
        "EVENTHUB_CONNECTION_STRING": version,
        "SYNAPSE_PASSWORD": version[:-6] + "3",
    }
    assert entrypoint.secret_versions("") == {} and entrypoint.load_secrets({}) == {}
    for bad in ("EVENTHUB_CONNECTION_STRING", "X=eventhub-connection", "1X=" + version):
        with pytest.raises(ValueError, match="BMS_SECRETS"):
            entrypoint.secret_versions(bad)
