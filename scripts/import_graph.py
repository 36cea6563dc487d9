"""Draw the project's import graph between its layers' modules, in Graphviz DOT.

    .venv/bin/python -m scripts.import_graph > imports.dot && dot -Tsvg imports.dot > imports.svg

One node per stage (`pipeline.<stage>`), per core module (`pipeline.core.<module>`) and per
registry module; an edge A -> B when any module in A imports one in B. Built with grimp, the
graph library import-linter checks the layer contract with (pyproject.toml).
"""

from __future__ import annotations

import sys


def node_of(module: str) -> str:
    """The node a module belongs to: the core's modules and the registry's one by one, a stage whole."""
    parts = module.split(".")
    if parts[0] == "registry" or parts[:2] == ["pipeline", "core"]:
        return ".".join(parts[:3] if parts[:2] == ["pipeline", "core"] else parts[:2])
    return ".".join(parts[:2])


def main() -> None:
    import grimp

    graph = grimp.build_graph("pipeline", "registry", cache_dir=None)
    edges = set()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            source, target = node_of(importer), node_of(imported)
            if source != target and target not in ("pipeline", "pipeline.core"):
                edges.add((source, target))
    lines = ["digraph tonetune {", "  rankdir=LR; node [shape=box, fontsize=10];"]
    lines += [f'  "{source}" -> "{target}";' for source, target in sorted(edges)]
    lines.append("}")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
