"""Run the notebook from a clean kernel and write it back with its outputs, figures included:

    python notebooks/execute.py

It also saves the figure of the cell tagged "readme-figure" as notebooks/selectivity.png, which README shows.
The test suite runs the same execute() without writing anything.
"""

import base64
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).with_name("Jamba_Hybrid_Mamba_Transformer_Arch.ipynb")


def execute(timeout=600):
    """The notebook, executed in a new kernel whose working directory is notebooks/; any cell error raises."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return notebook


def main():
    notebook = execute()
    nbformat.write(notebook, NOTEBOOK)
    for cell in notebook.cells:
        if "readme-figure" in cell.metadata.get("tags", []):
            image = next(out["data"]["image/png"] for out in cell.outputs if "image/png" in out.get("data", {}))
            NOTEBOOK.with_name("selectivity.png").write_bytes(base64.b64decode(image))
    print(f"wrote {NOTEBOOK} ({NOTEBOOK.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
