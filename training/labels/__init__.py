"""Labels from labeling platforms, as signed, credentialed manifests (specs/labels.md).

Each platform's own export goes in unchanged::

    from gradledger.training.labels import import_labels

    result = import_labels(project, "labelstudio", "export.json", authority="crowd", name="reviews",
                           examples={"17": x17, "18": x18, ...})   # the platform's key -> the example

The authority signs every manifest on behalf of the annotators, who hold no keys (each is
credentialed as a source on first sight; every vote says it was attested by the authority). A model
pre-label naming a gradledger run and checkpoint (``model_version = "gradledger:<run>@<hex>"``) is
recorded in the manifest, and the verifier checks that checkpoint where the run is in the ledger.
The command line: ``gradledger labels import --format labelbox|labelstudio|scale|snorkel FILE ...``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

from gradledger.ledger.files import read_regular

from . import labelbox, labelstudio, scale
from .records import MAX_EXPORT, LabelImportError, LabelRecord, Prelabel, Vote
from .signing import ImportedLabels, sign_records

if TYPE_CHECKING:
    from ..project import Project

__all__ = ["FORMATS", "ImportedLabels", "LabelImportError", "LabelRecord", "Prelabel", "Vote", "import_labels",
           "parse_export"]

#: Each format's parser: export bytes (and its options) -> records.
FORMATS: dict[str, Callable[..., list[LabelRecord]]] = {
    "labelbox": labelbox.parse,
    "labelstudio": labelstudio.parse,
    "scale": scale.parse,
}


def parse_export(fmt: str, export: bytes | str | os.PathLike[str], **options: Any) -> list[LabelRecord]:
    """The records of a platform export (bytes, or a file read with its size bounded first)."""
    if fmt not in FORMATS:
        raise LabelImportError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
    data = export if isinstance(export, bytes) else read_regular(export, MAX_EXPORT, f"{fmt} export",
                                                                 LabelImportError)
    return FORMATS[fmt](data, **options)


def import_labels(project: "Project", fmt: str, export: bytes | str | os.PathLike[str], *, authority: str,
                  name: str, examples: Mapping[str, Any], ontology: str | None = None,
                  **options: Any) -> ImportedLabels:
    """Parse ``export`` (``fmt``: labelbox, labelstudio, scale), sign its records as ``authority``
    and commit them as dataset ``name``, example ``i`` being ``examples[keys[i]]`` (specs/labels.md).
    ``options`` are the format's: ``key`` (which field names the example), ``question`` (which
    classification), Labelbox ``project``, Scale ``source``."""
    return sign_records(project, parse_export(fmt, export, **options), authority=authority, name=name,
                        examples=examples, ontology=ontology)
