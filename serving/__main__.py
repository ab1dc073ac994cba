"""CLI: start (or attach to) Triton, probe the dense/pruned pair of a run, write reports/<name>/.

    python -m serving --repository model_repository --run runs/<name> --report-dir reports/<name>
                      [--url host:port [--grpc-url host:port]] [--protocol http|grpc|both] [--quick]
    python -m serving reload --url host:port --model NAME [--version N]
        (a running server in explicit model-control mode picks up a newly exported version)
    python -m serving soak --run runs/<name> [--repository DIR | --url host:port] [--minutes 10]
        (64 clients on both models for minutes: failures, p50/p99 and memory per minute; serving/soak.py)
    python -m serving faults --run runs/<name> [--dense-run runs/<name>_dense] [--export-kills 10]
        (stub, server and export SIGKILLed under load, on copies; serving/faults.py)

A run whose served outputs differ from onnxruntime, or whose load test had failed requests, is a failed
check: the reports are written, and the exit code is 1.
"""
from __future__ import annotations

import sys
from pathlib import Path

from polarprune.common.cli import EXIT_FAILED, EXIT_OK, cli_parser, fail
from polarprune.serving.admin import TritonAdmin
from polarprune.serving.container import bundled_server_refusal
from polarprune.serving.errors import ServerInputError, ServingStageError
from polarprune.serving.loadtest import run_load_probes
from polarprune.serving.plans import plan_refusals
from polarprune.serving.probes import ProbeSettings, run_probes
from polarprune.serving.reload import reload_model
from polarprune.serving.report import write_report
from polarprune.serving.run_artifacts import load_run
from polarprune.serving.server import LocalTriton, LocalTritonConfig, RemoteTriton
from polarprune.serving.soak import SoakSettings, soak, summarize as summarize_soak, write_soak_report

PROG = "python -m serving"


def parse_args(argv: list[str] | None = None):
    arguments = cli_parser(PROG, __doc__.split("\n")[0],
                       epilog="Also: python -m serving reload --url host:port --model NAME (see reload --help);\n"
                                  "python -m serving soak --run runs/NAME [--minutes 10] (see soak --help).")
    arguments.add_argument("--repository", type=Path, default=Path("model_repository"),
                           help="Triton model repository written by the export stage")
    arguments.add_argument("--run", type=Path, required=True,
                           help="run folder holding export_report.json and test_samples.npz")
    arguments.add_argument("--report-dir", type=Path, default=None, help="default: reports/<run name>")
    arguments.add_argument("--url", default=None,
                           help="HTTP host:port of an already running Triton (e.g. NVIDIA's container); "
                                "default: start the bundled server on free loopback ports")
    arguments.add_argument("--grpc-url", default=None, help="gRPC host:port with --url (default: HTTP port + 1)")
    arguments.add_argument("--protocol", choices=("http", "grpc", "both"), default="both",
                           help="protocols to probe; the first is the headline and throughput protocol")
    arguments.add_argument("--quick", action="store_true", help="seconds-long probes (smoke tests)")
    arguments.add_argument("--http-port", type=int, default=0, help="local server HTTP port (0 = free port)")
    arguments.add_argument("--grpc-port", type=int, default=0, help="local server gRPC port (0 = free port)")
    arguments.add_argument("--startup-timeout", type=float, default=90.0, help="seconds to wait for readiness")
    arguments.add_argument("--perf-analyzer", default=None, help="path to the perf_analyzer binary")
    arguments.add_argument("--no-perf-analyzer", action="store_true", help="skip the perf_analyzer probe")
    arguments.add_argument("--server-tensorrt", default=None,
                           help="TensorRT version of the --url server, when its Triton release is not one "
                                "polarprune knows; TensorRT plans built by another version are refused")
    return arguments.parse_args(argv)


def server_triton_version(url: str) -> str | None:
    """The Triton version a running server reports in its metadata, None if it does not answer."""
    with TritonAdmin(url.split("://", 1)[-1].rstrip("/"), timeout_s=5.0) as admin:
        return admin.server_version()


def reload_main(argv: list[str]) -> int:
    prog = f"{PROG} reload"
    arguments = cli_parser(prog, "Load a newly exported model version into a running Triton (explicit model "
                             "control) and wait until it serves.")
    arguments.add_argument("--url", required=True, help="HTTP host:port of the running server")
    arguments.add_argument("--model", required=True, help="model name in the server's repository")
    arguments.add_argument("--version", default=None, help="version to wait for (default: the newest loaded)")
    arguments.add_argument("--timeout", type=float, default=120.0, help="seconds for the load and the switch")
    args = arguments.parse_args(argv)
    try:
        url = args.url.split("://", 1)[-1].rstrip("/")
        result = reload_model(url, args.model, args.version, args.timeout)
    except ServingStageError as error:
        return fail(prog, error)
    print(f"{result.model}: serving version {result.served_version} after {result.seconds:.1f} s "
          f"(ready before {list(result.versions_before)}, now {list(result.versions_after)})")
    return EXIT_OK


def soak_main(argv: list[str]) -> int:
    prog = f"{PROG} soak"
    arguments = cli_parser(prog, "Dense and pruned under many concurrent clients (HTTP and gRPC, mixed batch "
                           "sizes) for minutes: requests, failures by reason, p50/p99 and server/stub memory "
                           "per minute; a leak is judged on memory growth after the warm-up minute.",
                           epilog="A failed request, a leak, a p99 rise beyond --max-p99-ratio or a server that "
                                  "dies is a failed check (exit 1); the reports are written unless the server died.")
    arguments.add_argument("--run", type=Path, required=True, help="run folder (export_report.json, test_samples.npz)")
    arguments.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository")
    arguments.add_argument("--url", default=None, help="HTTP host:port of a running server (default: start the bundled one)")
    arguments.add_argument("--grpc-url", default=None, help="gRPC host:port with --url (default: HTTP port + 1)")
    arguments.add_argument("--report-dir", type=Path, default=None, help="default: reports/<run name>")
    arguments.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    arguments.add_argument("--interval", type=float, default=60.0,
                           help="seconds per report row; the first row is the warm-up (default 60)")
    arguments.add_argument("--clients", type=int, default=64, help="concurrent clients over both models (default 64)")
    arguments.add_argument("--max-growth-pct", type=float, default=5.0, help="memory growth after warm-up that is a leak")
    arguments.add_argument("--max-p99-ratio", type=float, default=1.5, help="p99 last interval / first interval limit")
    arguments.add_argument("--startup-timeout", type=float, default=90.0, help="seconds to wait for readiness")
    args = arguments.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0 or args.clients < 2:
        arguments.error("--minutes and --interval must be > 0 and --clients >= 2")
    settings = SoakSettings(seconds=60.0 * args.minutes, clients=args.clients, interval_s=args.interval,
                            max_growth_pct=args.max_growth_pct, max_p99_ratio=args.max_p99_ratio)
    try:
        run = load_run(args.run)
        models = {role: run.model_names[role] for role in ("dense", "pruned")}
        if args.url:
            server = RemoteTriton(args.url, args.grpc_url, tuple(models.values()), timeout_s=args.startup_timeout)
        else:
            server = LocalTriton(LocalTritonConfig(args.repository, tuple(models.values()),
                                                   startup_timeout_s=args.startup_timeout))
        with server as endpoints:
            local = isinstance(server, LocalTriton)
            print(f"Triton ready: http {endpoints.http_url}, grpc {endpoints.grpc_url}; models {list(models.values())}",
                  flush=True)
            raw = soak({"http": endpoints.http_url, "grpc": endpoints.grpc_url}, models, run.images, settings,
                       server.pid if local else None, server.process if local else None,
                       log=lambda message: print(message, flush=True))
    except ServingStageError as error:
        return fail(prog, error)
    summary = summarize_soak(raw, run.name, "the bundled tritonserver" if not args.url else args.url)
    report_dir = args.report_dir or Path("reports") / run.name
    write_soak_report(raw, summary, report_dir)
    print(f"wrote {report_dir}/soak.json, soak.md, soak_raw.json, soak_memory.png")
    if not summary["ok"]:
        print(f"{prog}: error: {'; '.join(summary['problems'])}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def faults_main(argv: list[str]) -> int:
    prog = f"{PROG} faults"
    arguments = cli_parser(prog, "Inject faults under load on copies of a run's served models and measure what "
                           "users see: a stub SIGKILLed, the server SIGKILLed under `serving soak`, `python -m "
                           "export` SIGKILLed while a server serves its repository (serving/faults.py).",
                           epilog="A fault whose outcome is not the expected one is a failed check (exit 1); "
                                  "reports/<run>/faults.json is written either way.")
    arguments.add_argument("--run", type=Path, required=True, help="run folder (exported: export_report.json)")
    arguments.add_argument("--dense-run", type=Path, default=None, help="its dense reference, as given to export")
    arguments.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository")
    arguments.add_argument("--report-dir", type=Path, default=None, help="default: reports/<run name>")
    arguments.add_argument("--export-kills", type=int, default=10, help="SIGKILLs of python -m export (default 10)")
    arguments.add_argument("--seed", type=int, default=0, help="seed of the random kill points")
    args = arguments.parse_args(argv)
    import shutil
    import tempfile

    from polarprune.common.atomicio import write_json
    from polarprune.common.results import provenance
    from polarprune.serving.faults import copy_models, kill_exports, kill_server_under_soak, kill_stub_under_load

    try:
        run = load_run(args.run)
        models = {role: run.model_names[role] for role in ("dense", "pruned")}
        work = Path(tempfile.mkdtemp(prefix="polarprune-faults-"))
        try:
            repository = copy_models(args.repository, tuple(models.values()), work / "repo")
            print("stub kill: SIGKILL of the dense model's stub under 64 clients ...", flush=True)
            server = LocalTriton(LocalTritonConfig(repository, tuple(models.values())))
            server.start()
            try:
                stub = kill_stub_under_load(server, models, run.images, seconds=60, kill_after_s=20, clients=64,
                                            log=lambda message: print(message, flush=True))
            finally:
                server.stop()
            print(f"  {stub}", flush=True)
            servers = []
            for attach in (True, False):
                print(f"server kill ({'attached' if attach else 'its own server'}) ...", flush=True)
                servers.append(kill_server_under_soak(args.run, repository, tuple(models.values()), attach=attach,
                                                      load_s=5.0, report_dir=work / "soak_reports"))
                print(f"  {servers[-1]}", flush=True)
            runs = work / "runs"
            shutil.copytree(args.run, runs / args.run.name)
            export_args = ["--run", str(runs / args.run.name)]
            if args.dense_run:
                shutil.copytree(args.dense_run, runs / args.dense_run.name)
                export_args += ["--dense-run", str(runs / args.dense_run.name)]
            print(f"export kill: {args.export_kills} SIGKILLs of python -m export under a live server ...", flush=True)
            exports = kill_exports(export_args, repository, tuple(models.values()), kills=args.export_kills,
                                   seed=args.seed, log=lambda message: print(f"  {message}", flush=True))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except ServingStageError as error:
        return fail(prog, error)
    checks = {"stub kill": stub["only_in_flight_failed"] and stub["failed_other_model"] == 0
              and stub["recovery_s"] is not None and stub["recovery_s"] < 30,
              "server kill": all(entry["ok"] for entry in servers), "export kill": exports["ok"]}
    report = {"run": run.name, "models": models, "stub_kill": stub, "server_kill": servers, "export_kill": exports,
              "checks": checks, "ok": all(checks.values()), "provenance": provenance()}
    report_dir = args.report_dir or Path("reports") / run.name
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "faults.json", report)
    print(f"wrote {report_dir}/faults.json: " + ", ".join(f"{name} {'ok' if ok else 'FAILED'}"
                                                          for name, ok in checks.items()))
    if not report["ok"]:
        print(f"{prog}: error: failed: {', '.join(name for name, ok in checks.items() if not ok)} "
              f"(see {report_dir}/faults.json)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["faults"]:
        return faults_main(argv[1:])
    if argv[:1] == ["reload"]:
        return reload_main(argv[1:])
    if argv[:1] == ["soak"]:
        return soak_main(argv[1:])
    args = parse_args(argv)
    protocols = ("http", "grpc") if args.protocol == "both" else (args.protocol,)
    factory = ProbeSettings.quick if args.quick else ProbeSettings
    settings = factory(protocols=protocols, perf_analyzer=not args.no_perf_analyzer,
                       perf_analyzer_path=args.perf_analyzer)
    try:
        run = load_run(args.run)
        models = (run.model_names["dense"], run.model_names["pruned"])
        if not args.url and (refusal := bundled_server_refusal(args.repository, models)):
            raise ServerInputError(refusal)
        if args.url and (refusals := plan_refusals(args.repository, models, server_triton_version(args.url),
                                                   args.server_tensorrt)):
            detail = "\n".join(f"  {model}: {why}" for model, why in refusals.items())
            raise ServerInputError(f"refusing to serve TensorRT plan(s) the server cannot load:\n{detail}")
        if args.url:
            server = RemoteTriton(args.url, args.grpc_url, models, timeout_s=args.startup_timeout)
        else:
            server = LocalTriton(LocalTritonConfig(args.repository, models, args.http_port, args.grpc_port,
                                                   startup_timeout_s=args.startup_timeout))
        with server as endpoints:
            print(f"Triton ready: http {endpoints.http_url}, grpc {endpoints.grpc_url}; "
                  f"models {list(models)}")
            results = run_probes(endpoints, args.repository, run, settings)
            server_pid = server.pid if isinstance(server, LocalTriton) else None  # remote: not visible
            results.update(run_load_probes(endpoints, run.model_names, run.images, settings, server_pid))
    except ServingStageError as error:
        return fail(PROG, error)
    report_dir = args.report_dir or Path("reports") / run.name
    summary, markdown = write_report(results, run, report_dir, "quick" if args.quick else "full")
    print(f"\nwrote {report_dir}/serving.json, serving.md, serving_raw.json, latency.png, throughput.png\n")
    print(markdown)
    failed = [role for role, entry in summary["correctness"].items() if entry.get("ok") is False]
    if failed:
        print(f"{PROG}: error: served outputs differ from onnxruntime for {failed}", file=sys.stderr)
        return EXIT_FAILED
    load = summary["load_test"]
    if load["failures"]:
        print(f"{PROG}: error: {load['failures']} of {load['requests'] + load['failures']} load-test requests "
              f"failed, e.g. {load['first_errors'][0]}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
