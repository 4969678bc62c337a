"""Command line: `kdlab prepare`, `kdlab train`, `kdlab eval`, `kdlab correct-teacher`, `kdlab cache-teacher`,
and `kdlab preflight` from the course (an entry point of group "kdlab.commands"); also `python -m kdlab ...`.

Every config field has a flag (`alpha_kd` -> `--alpha-kd`); precedence is defaults < --config
YAML < flags. User mistakes print one `kdlab: error: ...` line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

from kdlab.config import FIELDS, GROUPS, KDConfig, field_info, fields_by_group, format_value, load_config, parse_value
from kdlab.errors import KDLabError

log = logging.getLogger("kdlab")


HELP_WIDTH = 100  # the help is wrapped to the terminal, but never wider than this


class _HelpFormatter(argparse.HelpFormatter):
    """At most HELP_WIDTH columns; flags and values such as --kd-top-k or teacher-layers are never
    broken at their hyphens."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 30, width: int | None = None):
        if width is None:
            width = min(shutil.get_terminal_size().columns - 2, HELP_WIDTH)
        super().__init__(prog, indent_increment, max_help_position, max(width, 40))

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            self._whitespace_matcher.sub(" ", text).strip(),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


CONFIG_FLAGS_USAGE = "%(prog)s [-h] [--config FILE] [--FIELD VALUE | --[no-]FIELD ...]"
CONFIG_FLAGS_DESCRIPTION = (
    "Every config field has a flag: YAML key alpha_kd is --alpha-kd. Precedence: defaults < "
    "--config FILE < flags. {a,b} lists a field's allowed values."
)


def _metavar(info) -> str:
    if info.choices:
        return "{" + ",".join(info.choices) + "}"
    return "YAML" if isinstance(info.default, dict) else info.type.__name__.upper()


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per KDConfig field, in argument groups by section, with the field's description,
    allowed values and default (all read from the field: kdlab.config.field_info)."""
    p.add_argument("--config", metavar="FILE", help="YAML file of config fields (flags override its values)")
    for group, names in fields_by_group().items():
        g = p.add_argument_group(group, GROUPS[group])
        for name in names:
            info = field_info(name)
            text = f"{info.help} (default: {format_value(info.default)})".replace("%", "%%")
            if info.type is bool:
                g.add_argument(info.flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:  # parsed and checked by the config (parse_value, KDConfig), so errors read the same as YAML's
                g.add_argument(info.flag, dest=name, metavar=_metavar(info), default=None, help=text)


def _config(args: argparse.Namespace, extra: dict | None = None) -> KDConfig:
    overrides = {}
    for name in FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value if isinstance(value, bool) else parse_value(name, value)
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    from kdlab.quiet import quiet_libraries

    quiet_libraries()


def cmd_prepare(args) -> int:
    from kdlab.data.corpus import prepare_data
    from kdlab.models import BUILTIN_TEACHERS, load_tokenizer, prepare_teacher

    cfg = _config(args)
    t0 = time.perf_counter()
    if cfg.teacher in BUILTIN_TEACHERS:  # both built-in teachers: the course and the CLI use either
        for name in BUILTIN_TEACHERS:
            log.info("teacher %s: %s", name, prepare_teacher(cfg.data_dir, name))
    tok = load_tokenizer(cfg.teacher, cfg.data_dir)
    data = prepare_data(cfg.data, cfg.data_dir, tok, cfg.seq_len)  # builds Austen + the token cache
    for split, d in data.items():
        log.info("%-10s %5d blocks of %d, %9s tokens", split, len(d), cfg.seq_len, f"{d.num_tokens:,}")
    log.info("prepared in %.1f s", time.perf_counter() - t0)
    return 0


def cmd_train(args, callbacks=()) -> int:
    """`kdlab train` (`callbacks`: more of them, for a script that runs the command with its own)."""
    from kdlab.build import train
    from kdlab.training.evaluation import format_summary

    cfg = _config(args)
    t0 = time.perf_counter()
    state = train(cfg, callbacks)
    seconds = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 1 if state.failed else 130 if state.interrupted else 0
    if state.interrupted:
        print(
            f"interrupted at step {state.step} ({state.tokens:,} tokens, {seconds:.0f} s); continue with "
            f"`kdlab train --out-dir {cfg.out_dir} --resume` and the same settings"
        )
        return 130  # the shell's code for a run stopped by Ctrl-C
    print(format_summary(state.history))
    print(f"done: {state.step} steps, {state.tokens:,} tokens in {seconds:.1f} s; run folder {cfg.out_dir}")
    if state.failed:
        print(f"kdlab: error: the run stopped early: {state.stop_reason}", file=sys.stderr)
        return 1
    if state.stop_reason:
        print(f"stopped early: {state.stop_reason}")
    return 0


def cmd_eval(args) -> int:
    from kdlab.build import build_components, tokenizer_pair
    from kdlab.generation import generate, held_out_prompts
    from kdlab.models import build_student
    from kdlab.payoff import format_payoff, payoff_rows
    from kdlab.precision import describe_device

    speed_batches = _int_list(args.speed_batches, "--speed-batches")
    cfg = _config(args, {"student_init": "random"})  # --student names a trained model folder
    precision, tokenizer, teacher, data, student = build_components(cfg)
    # a student tokenizer of its own: the teacher reads the same text in its tokens
    pair = tokenizer_pair(cfg.student_tokenizer, cfg.teacher, str(cfg.data_dir)) if cfg.student_tokenizer else None
    students = {cfg.student: student}
    for folder in args.students:  # more students to compare, each a saved model folder
        own = {"tokenizer": pair.student} if pair is not None else {}  # its embedding must match that tokenizer
        students[folder] = build_student(folder, teacher, "random", cfg.data_dir, precision, len(tokenizer), **own)
    splits = ("validation", "test") if args.split == "both" else (args.split,)
    rows = payoff_rows(
        teacher,
        students,
        data,
        precision,
        tokenizer,
        batch_size=cfg.batch_size,
        eval_batches=cfg.eval_batches,
        speed_batches=speed_batches,
        splits=splits,
        pair=pair,
    )
    print(format_payoff(rows))
    print(f"(on {describe_device(precision.device)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": describe_device(precision.device), "rows": rows}, indent=1))
    if args.samples:
        prompts = held_out_prompts(cfg.data, cfg.data_dir, n=args.samples)
        settings = {
            "greedy": dict(sample=False),
            "sampled (T 0.8, top-p 0.9, repetition penalty 1.1, seed 0)": dict(
                sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=0
            ),
        }
        for title, options in settings.items():
            print(f"\n# {title}, 32 new tokens")
            for name, model in {"teacher": teacher, **students}.items():
                tok = pair.teacher if pair is not None and model is teacher else tokenizer
                for c in generate(model, tok, prompts, max_new_tokens=32, precision=precision, **options):
                    print(f"{name[:24]:24} | {c.prompt} ... {' '.join(c.text.split())}")
    return 0


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = (0,)
    if any(v < 1 for v in values):
        raise KDLabError(f"{flag}={text!r} must list batch sizes >= 1 such as 1,8 ('' = no speed measurement)")
    return values


def cmd_correct_teacher(args) -> int:
    from kdlab.correction import correct_teacher

    cfg = _config(args)
    r = correct_teacher(cfg, progress=not args.verbose < 0)
    print(f"{'teacher':28}  {'val ppl':>8}  {'test ppl':>8}")
    for who, key in ((cfg.teacher, "before"), (f"{cfg.teacher} + adapter", "after")):
        ppl = r[key]["perplexity"]
        print(f"{who:28}  {ppl['validation']:>8.2f}  {ppl['test']:>8.2f}")
    print(
        f"(validation {r['eval_tokens']['validation']:,} tokens, test {r['eval_tokens']['test']:,}; "
        f"{r['steps']} steps, {r['tokens']:,} tokens in "
        f"{r['train_seconds']:.0f} s "
        f"on {r['device']}); adapter {cfg.correct_out}/adapter ({r['adapter_bytes'] / 1e6:.1f} MB, "
        f"sha256 {r['adapter_sha256'][:16]}...)"
    )
    return 0


def cmd_cache_teacher(args) -> int:
    from kdlab.build import build_components
    from kdlab.data.teacher_cache import build_teacher_cache, key_for_run, open_teacher_cache

    cfg = _config(args)
    if not cfg.teacher_cache:
        raise KDLabError("cache-teacher needs --teacher-cache FOLDER (where to write the cache)")
    precision, tokenizer, teacher, data, _ = build_components(cfg)
    key = key_for_run(cfg, data["train"], tokenizer, teacher)
    try:
        cache = open_teacher_cache(cfg.teacher_cache, key)
        log.info("teacher cache %s is up to date (%d blocks, %s)", cfg.teacher_cache, key["blocks"], key["kind"])
    except KDLabError as e:
        if (Path(cfg.teacher_cache) / "meta.json").is_file():
            log.info("rebuilding: %s", e)
        cache = build_teacher_cache(
            cfg.teacher_cache,
            teacher,
            data["train"],
            key,
            device=precision.device,
            # no gradients: batches larger than training's fit
            batch_size=max(8, cfg.batch_size),
            chunk_tokens=cfg.loss_chunk_tokens,
        )
    if key["kind"] == "hidden":
        what = f"final hidden states ({key['dtype']})"
        flags = f"--teacher-cache-kind hidden --teacher-cache-dtype {key['dtype']}"
    else:
        what = f"top-{key['top_k']} at T={key['temperature']:g}"
        flags = f"--kd-top-k {cfg.kd_top_k}"
    print(
        f"teacher cache {cfg.teacher_cache}: {key['blocks']} blocks, {what}, {cache.nbytes / 2**20:,.0f} MiB "
        f"({cache.bytes_per_token:,.0f} bytes a token); train with --teacher-cache {cfg.teacher_cache} {flags}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kdlab", description="Knowledge distillation for causal language models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbose", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "prepare",
        help="build the corpus, the converted teacher and the token cache",
        usage=CONFIG_FLAGS_USAGE,
        description="Builds the corpus, the converted teacher and the token cache. " + CONFIG_FLAGS_DESCRIPTION,
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser(
        "train",
        help="distil the teacher into the student",
        usage=CONFIG_FLAGS_USAGE,
        description="Distils the teacher into the student. " + CONFIG_FLAGS_DESCRIPTION,
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "eval",
        help="the payoff: students (e.g. runs/default/final) against the teacher on quality and speed",
        usage=CONFIG_FLAGS_USAGE + " [--split {validation,test,both}] [--speed-batches LIST] [--samples N] "
        "[--json FILE] [STUDENT ...]",
        description="Measures the teacher and each student (--student, a trained model folder such as "
        "runs/default/final, and any STUDENT folders after the flags): parameters, generation speed "
        "(tokens/s, KV cache, greedy), perplexity and bits per byte, KL(teacher || student) and top-1 "
        "agreement, and the ratios to the teacher. " + CONFIG_FLAGS_DESCRIPTION,
    )
    _add_config_flags(p)
    p.add_argument(
        "--split",
        choices=["validation", "test", "both"],
        default="both",
        help="the split(s) to evaluate (default: both)",
    )
    p.add_argument("students", nargs="*", metavar="STUDENT", help="more saved student folders to compare")
    p.add_argument(
        "--speed-batches",
        default="1,8",
        metavar="LIST",
        help="batch sizes at which generation speed is measured (default: 1,8; '' = none)",
    )
    p.add_argument(
        "--samples", type=int, default=0, metavar="N", help="print N held-out prompts continued by each model"
    )
    p.add_argument("--json", metavar="FILE", help="also write the table's rows to FILE")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser(
        "correct-teacher",
        help="fine-tune a LoRA adapter of the teacher on the corpus (teacher correction)",
        usage=CONFIG_FLAGS_USAGE,
        description="Trains a LoRA adapter of the frozen teacher on the training split (--correct-steps, "
        "--correct-rank, --correct-lr, ...) and reports validation and test perplexity before and after; "
        "the adapter goes to --correct-out. " + CONFIG_FLAGS_DESCRIPTION,
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_correct_teacher)
    p = sub.add_parser(
        "cache-teacher",
        help="precompute the teacher's top-k for the training set (--teacher-cache)",
        usage=CONFIG_FLAGS_USAGE,
        description="Precomputes the teacher's top-k (--kd-top-k) for the training set into "
        "--teacher-cache FOLDER. " + CONFIG_FLAGS_DESCRIPTION,
    )
    _add_config_flags(p)
    p.set_defaults(func=cmd_cache_teacher)
    # commands that other packages add (entry-point group "kdlab.commands"): the course's `kdlab
    # preflight` (kdlab.course.preflight), so the core never imports the course
    for entry in sorted(importlib.metadata.entry_points(group="kdlab.commands"), key=lambda e: e.name):
        try:
            entry.load()(sub)
        except Exception as e:  # one broken add-on must not take every command with it
            log.warning("kdlab: the command %r (%s) did not load: %s", entry.name, entry.value, e)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KDLabError as e:
        print(f"kdlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
