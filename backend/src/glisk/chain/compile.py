"""Compile the GLISK contract with solc from npm and write (or check) the committed artifact.

    uv run python -m glisk.chain.compile           # rewrite chain/artifacts/GliskNFT.json
    uv run python -m glisk.chain.compile --check   # exit 1 if recompiling gives anything else

The compiler gets one self-contained Standard JSON input: the contract and every OpenZeppelin file
it imports, read from the pinned npm packages (``glisk.npm``) under their import names
(``@openzeppelin/contracts/...``), never a path of this machine. The same source, compiler and
settings give the same bytes on any machine, which is what ``--check`` relies on (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from glisk import npm
from glisk.errors import OperatorError

HERE = Path(__file__).resolve().parent
CONTRACT = "GliskNFT"
SOURCE = HERE / "contracts" / f"{CONTRACT}.sol"
ARTIFACT = HERE / "artifacts" / f"{CONTRACT}.json"
SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    # Cancun: what Base and Ethereum run, and what anvil's default hardfork accepts.
    "evmVersion": "cancun",
    "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}},
}
# solc-js's own compile(), fed the Standard JSON input on stdin (its CLI prints a banner on stdout).
_RUN_SOLC = """
const solc = require(process.argv[1]);
let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const output = JSON.parse(solc.compile(input));
  process.stdout.write(JSON.stringify({version: solc.version(), output: output}));
});
"""
_IMPORT = re.compile(r"""^\s*import\s+(?:[^;]*?\s+from\s+)?["']([^"']+)["']\s*;""", re.MULTILINE)


class CompileError(OperatorError):
    """solc refused the source, or the artifact differs from what the source compiles to."""


def _resolve(importer: str, target: str) -> str:
    """The source unit name solc gives ``target`` imported from ``importer``."""
    if not target.startswith("."):
        return target
    parts = importer.split("/")[:-1]
    for part in target.split("/"):
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


def standard_input(modules: Path) -> dict[str, Any]:
    """The Standard JSON input: the contract and, transitively, every file it imports."""
    name = f"{CONTRACT}.sol"
    sources: dict[str, str] = {name: SOURCE.read_text()}
    queue = [name]
    while queue:
        unit = queue.pop()
        for target in _IMPORT.findall(sources[unit]):
            resolved = _resolve(unit, target)
            if resolved not in sources:
                path = modules / resolved
                if not path.is_file():
                    raise CompileError(f"{unit} imports {target}: not found in {modules}")
                sources[resolved] = path.read_text()
                queue.append(resolved)
    return {
        "language": "Solidity",
        "sources": {key: {"content": sources[key]} for key in sorted(sources)},
        "settings": SETTINGS,
    }


def compile_artifact() -> dict[str, Any]:
    """Compile the contract; the artifact as it is committed. Raises CompileError."""
    modules = npm.node_modules()
    request = json.dumps(standard_input(modules))
    result = subprocess.run(
        [npm.node(), "-e", _RUN_SOLC, str(modules / "solc")],
        input=request,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise CompileError(f"solc exited with {result.returncode}: {result.stderr.strip()[:300]}")
    answer = json.loads(result.stdout)
    output = answer["output"]
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise CompileError(f"solc: {errors[0].get('formattedMessage', errors[0])}")
    compiled = output["contracts"][f"{CONTRACT}.sol"][CONTRACT]
    return {
        "contractName": CONTRACT,
        "sourceName": f"contracts/{CONTRACT}.sol",
        "compiler": {"solc": answer["version"], "settings": SETTINGS},
        "abi": compiled["abi"],
        "bytecode": "0x" + compiled["evm"]["bytecode"]["object"],
        "deployedBytecode": "0x" + compiled["evm"]["deployedBytecode"]["object"],
    }


def render(artifact: dict[str, Any]) -> str:
    return json.dumps(artifact, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glisk.chain.compile", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed artifact is not what compiles"
    )
    args = parser.parse_args(argv)
    try:
        text = render(compile_artifact())
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        committed = ARTIFACT.read_text() if ARTIFACT.exists() else ""
        if committed != text:
            print(
                f"{ARTIFACT.name} differs from what {SOURCE.name} compiles to: "
                "run 'uv run python -m glisk.chain.compile' and commit the result",
                file=sys.stderr,
            )
            return 1
        print(f"{ARTIFACT.name} is what {SOURCE.name} compiles to")
        return 0
    ARTIFACT.write_text(text)
    print(f"wrote {ARTIFACT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
