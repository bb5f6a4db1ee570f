"""Where the golden tests find the reference probe's published outputs (Qwen3-14B): ``tests/data/reference``
in this repository (provenance in its README), or ``$JAXLENS_REFERENCE_DIR`` when a user points elsewhere."""
import os
from pathlib import Path

REF_DIR = Path(os.environ.get("JAXLENS_REFERENCE_DIR") or Path(__file__).resolve().parent / "data" / "reference")
HEADERS_JSON = REF_DIR / "csv-headers.json"
PURE_CSV = REF_DIR / "output-Qwen3-14B-pure-next-token.csv"
MILESTONES_CSV = REF_DIR / "output-Qwen3-14B-milestones.csv"
SKELETON = REF_DIR / "output-Qwen3-14B.skeleton.json"
REPORT_MD = REF_DIR / "evaluation-report-Qwen3-14B.md"
