"""The ``bms`` command: ``run``, ``sim``, ``plant``, ``status``, ``faults``, ``check-config``,
``identify``, ``replay``, ``health``, ``failsafe``.

Exit codes: 0 clean stop (contactors confirmed open), 1 contactors not confirmed open,
2 configuration or usage error, 3 the configured hardware or files could not be opened,
4 the loop itself failed (contactors opened as it stopped).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import logging.handlers
import queue
import sys
from pathlib import Path

from bms import backends, exit_codes
from bms.config import (
    SIM_BACKEND,
    ConfigError,
    load_config,
    load_contactor_config,
    load_tool_config,
)
from bms.health import command as health_command
from bms.service import tools
from bms.service.journal import JournalHandler, journal_wanted

DEFAULT_SIM_CONFIG = "config/sim.toml"


def _fault_kinds_help() -> str:
    """The simulator's fault kinds, for ``bms sim --help``."""
    try:
        kinds = backends.load("bms.simulators", SIM_BACKEND).FAULT_KINDS
    except backends.UnknownBackendError:
        return "no simulator is installed"
    lines = [f"  {kind:<10} {text}" for kind, text in kinds.items()]
    return "fault kinds for --inject:\n" + "\n".join(lines)


FAULT_KINDS_EPILOG = "(fault kinds)"
"""Placeholder for the simulator's fault kinds, filled in only when that help is shown: finding
them loads the simulator (Numba, the kernels), which `bms status` must not wait for."""


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        if self.epilog == FAULT_KINDS_EPILOG:
            self.epilog = _fault_kinds_help()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bms", description="Battery-management runtime.")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_loop_options(sub: argparse.ArgumentParser, default_config: str | None) -> None:
        sub.add_argument(
            "--config",
            default=default_config,
            required=default_config is None,
            help="TOML config file" + (f" (default {default_config})" if default_config else ""),
        )
        sub.add_argument(
            "--duration-s",
            type=float,
            default=None,
            help="stop after this many seconds (default: run until stopped)",
        )
        sub.add_argument(
            "--status-format",
            choices=["text", "json"],
            default="text",
            help="one status line per interval: for people, or one JSON object",
        )

    run = commands.add_parser("run", help="run the control loop on the configured hardware")
    add_loop_options(run, None)

    sim = commands.add_parser(
        "sim",
        help="run the control loop on the simulated pack",
        epilog=FAULT_KINDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loop_options(sim, DEFAULT_SIM_CONFIG)
    sim.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="KIND@T_S[:cell=N]",
        help="inject a fault T_S seconds after start; cells count from 1; repeatable",
    )

    plant = commands.add_parser(
        "plant",
        help="run only the simulated pack on the configured bus (the BMS runs elsewhere)",
        epilog=FAULT_KINDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plant.add_argument("--config", required=True, help="TOML config file with a [sim] section")
    plant.add_argument(
        "--duration-s", type=float, default=None, help="stop after this many seconds"
    )
    plant.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="KIND@T_S[:cell=N]",
        help="inject a fault T_S seconds after start; cells count from 1; repeatable",
    )

    failsafe = commands.add_parser(
        "failsafe",
        help="open the contactors and exit (systemd's ExecStopPost runs this)",
    )
    failsafe.add_argument("--config", required=True, help="TOML config file")
    failsafe.add_argument(
        "--hold-s", type=float, default=2.0, help="wait this long for the feedback (default 2)"
    )

    check = commands.add_parser("check-config", help="validate a config and print it resolved")
    check.add_argument("file")

    tool_config_help = (
        "TOML config file (default: $PYBMS_CONFIG, else /etc/pybms/pack.toml if it exists, "
        "else config/sim.toml)"
    )
    faults = commands.add_parser(
        "faults",
        help="list the latched faults and the fault log, or clear latched faults",
        description="With the BMS running, a clear is decided by the loop: only a fault whose "
        "cause is gone is cleared, and only for root or the [service] admin_group. With no BMS "
        "running, both copies of the latched set are cleared and the next start looks again.",
    )
    faults.add_argument("action", nargs="?", choices=["list", "clear"], default="list")
    faults.add_argument(
        "fault_ids", nargs="*", metavar="FAULT_ID", help="with clear: only these (default: all)"
    )
    faults.add_argument("--config", default=None, help=tool_config_help)

    status = commands.add_parser("status", help="the running BMS's pack at a glance")
    status.add_argument("--config", default=None, help=tool_config_help)
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")

    identify = commands.add_parser(
        "identify",
        help="fit a cell parameter set from an OCV test and HPPC pulse tests",
        description="CSV columns: time_s,current_a,voltage_v,temp_c (current positive when "
        "charging). Capacity and SOC come from the OCV test (a slow discharge and charge "
        "between the voltage limits); the impedance tables from one pulse test per "
        "temperature.",
    )
    identify.add_argument("--ocv", required=True, type=Path, help="the OCV test (CSV)")
    identify.add_argument(
        "--hppc", required=True, action="append", type=Path, help="a pulse test; repeatable"
    )
    identify.add_argument(
        "--power",
        action="append",
        type=Path,
        default=[],
        help="a power test (pulses from rest at a ladder of currents, each level); repeatable."
        " Without one, state of power comes from the ECM",
    )
    identify.add_argument("--out", required=True, type=Path, help="directory to write the set to")
    identify.add_argument("--name", help="the set's name (default: the directory's name)")
    identify.add_argument("--force", action="store_true", help="replace an existing set")

    replay = commands.add_parser(
        "replay",
        help="run the estimator over a logged single-cell CSV",
        description="Input columns: time_s,current_a,voltage_v,temp_c[,soc_true]. Output "
        "columns: time_s,soc,soc_std,voltage_pred_v,charge_limit_10s_a,discharge_limit_10s_a.",
    )
    replay.add_argument("--params", required=True, type=Path, help="cell parameter set directory")
    replay.add_argument("--input", required=True, type=Path, help="the log (CSV)")
    replay.add_argument("--out", required=True, type=Path, help="where to write the estimates")
    replay.add_argument(
        "--initial-soc",
        type=float,
        help="start here (0..1) instead of from the OCV of the first sample",
    )
    replay.add_argument(
        "--initial-soc-std",
        type=float,
        help="how uncertain that start is (default 0.3: a guess the voltage will correct)",
    )
    replay.add_argument("--plot", type=Path, metavar="REPORT.png", help="also draw a report")
    health_command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after an option (`faults clear --config F ID`);
    # subcommands rule out parse_intermixed_args, so the fault ids are collected here.
    if extra and args.command == "faults" and not any(a.startswith("-") for a in extra):
        args.fault_ids += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _log_through_a_queue(args.log_level)
    if args.command == "identify":
        return _identify(args)
    if args.command == "replay":
        return _replay(parser, args)
    if args.command == "health":
        return args.handler(args)
    path = args.file if args.command == "check-config" else args.config
    if path is None:  # status and faults
        path = tools.default_config()
    loaders = {
        "failsafe": load_contactor_config,
        "status": load_tool_config,
        "faults": load_tool_config,
    }
    loader = loaders.get(args.command, load_config)
    try:
        config = loader(path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return exit_codes.EXIT_USAGE_ERROR

    if args.command == "check-config":
        print(json.dumps(config.summary(), indent=2))
        return 0
    if args.command == "faults":
        return tools.faults(config, args.action, args.fault_ids)
    if args.command == "status":
        return tools.status(config, args.json)
    if args.command == "failsafe":
        from bms import app

        return app.failsafe(config, args.hold_s)
    if args.command in ("sim", "plant") and config.sim is None:
        print(f"{config.source}: `bms {args.command}` needs a [sim] section", file=sys.stderr)
        return exit_codes.EXIT_USAGE_ERROR
    from bms import app  # the loop's imports (Numba, the kernels) only where a loop runs

    stop = app.StopRequest()
    stop.install()
    if args.command == "plant":
        return app.run_plant(config, injections=args.inject, duration_s=args.duration_s, stop=stop)
    return app.run(
        config,
        simulate=args.command == "sim",
        injections=args.inject if args.command == "sim" else [],
        duration_s=args.duration_s,
        status_format=args.status_format,
        stop=stop,
    )


def _identify(args: argparse.Namespace) -> int:
    from bms.csvio import CsvError
    from bms.estimation.cell_params import CellParamsError
    from bms.estimation.fitting import FitError
    from bms.identify import describe, identify

    try:
        cell = identify(
            args.ocv, args.hppc, args.out, args.name or args.out.name, args.force, args.power
        )
    except (CsvError, FitError, FileExistsError, CellParamsError) as exc:
        print(f"bms identify: {exc}", file=sys.stderr)
        return exit_codes.EXIT_USAGE_ERROR
    except OSError as exc:
        print(f"bms identify: cannot write {args.out}: {exc}", file=sys.stderr)
        return exit_codes.EXIT_SETUP_FAILED
    print(f"wrote {args.out}: {describe(cell)}")
    return 0


def _replay(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from bms import replay
    from bms.csvio import CsvError
    from bms.estimation.cell_params import CellParamsError, load_cell_params
    from bms.estimation.estimator import warm_up

    if args.initial_soc is not None and not 0.0 <= args.initial_soc <= 1.0:
        parser.error("--initial-soc must lie in [0, 1]")
    std = replay.GUESS_SOC_STD if args.initial_soc_std is None else args.initial_soc_std
    if not 0.0 < std <= 1.0:
        parser.error("--initial-soc-std must lie in (0, 1]")
    for output in filter(None, (args.out, args.plot)):
        if output.is_dir() or not output.parent.is_dir():
            print(f"bms replay: cannot write {output}: no such directory", file=sys.stderr)
            return exit_codes.EXIT_USAGE_ERROR
    try:
        cell = load_cell_params(args.params)
        log = replay.read_log(args.input)
    except (CsvError, CellParamsError, ValueError) as exc:
        print(f"bms replay: {exc}", file=sys.stderr)
        return exit_codes.EXIT_USAGE_ERROR
    warm_up(cell)
    result = replay.replay(cell, log, args.initial_soc, std)
    try:
        replay.write_estimates(args.out, result)
    except OSError as exc:
        print(f"bms replay: cannot write {args.out}: {exc}", file=sys.stderr)
        return exit_codes.EXIT_SETUP_FAILED
    print(f"wrote {args.out}: {result.time_s.size} rows")
    scores = result.errors()
    if scores is not None:
        print(
            f"SOC error after {replay.SETTLE_S:.0f} s: RMSE {scores['rmse'] * 100:.2f} %, "
            f"max {scores['max_abs'] * 100:.2f} % ({scores['samples']} samples)"
        )
    if args.plot is not None:
        try:
            replay.plot(args.plot, result, f"{args.input.name} with {cell.name}")
        except ImportError:
            print(
                "bms replay: --plot needs matplotlib (pip install 'pybms[plot]')", file=sys.stderr
            )
            return exit_codes.EXIT_SETUP_FAILED
        except OSError as exc:
            print(f"bms replay: cannot write {args.plot}: {exc}", file=sys.stderr)
            return exit_codes.EXIT_SETUP_FAILED
        print(f"wrote {args.plot}")
    return 0


def _log_through_a_queue(level: str) -> None:
    """Log from a listener thread, so a blocked stderr never stalls the loop: to the journal
    with structured fields when stderr is the journal (under systemd), else to stderr."""
    records: queue.SimpleQueue = queue.SimpleQueue()
    if journal_wanted():
        output: logging.Handler = JournalHandler()
        output.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        output = logging.StreamHandler(sys.stderr)
        output.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    listener = logging.handlers.QueueListener(records, output)
    listener.start()
    atexit.register(listener.stop)
    to_queue = logging.handlers.QueueHandler(records)
    to_queue.setFormatter(logging.Formatter("%(message)s"))  # the listener formats the line
    logging.basicConfig(level=level, handlers=[to_queue])
