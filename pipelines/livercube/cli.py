"""The ``livercube`` command line: synth, convert, demo, info, catalog, preview, verify,
publish, ls, export.

Exit status: 0 everything converted; 3 some inputs skipped or failed (the report says which
and why, everything else is in the store); 4 ``verify`` found damage; 2 usage errors; 1
anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from livercube import registry
from livercube.convert import EXIT_FATAL, EXIT_OK, EXIT_USAGE, convert
from livercube.errors import LivercubeError, UsageError
from livercube.store.location import StoreLocation


def _kv(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they can be (``anon=true``, ``5``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _storage_options(items: list[str] | None) -> dict[str, Any] | None:
    opts = _kv(items)
    return opts or None


def _collection(name: str) -> str:
    """``--collection``: an id or alias of a registered collection (plug-ins included)."""
    cid = registry.canonical(name)
    if cid is None:
        raise argparse.ArgumentTypeError(
            f"unknown collection {name!r} (choose from {', '.join(registry.ids())})"
        )
    return cid


def _store(a: argparse.Namespace) -> StoreLocation:
    """The store named on the command line (``url`` + ``--storage-option``), parsed once."""
    return StoreLocation.of(a.url, _storage_options(a.storage_option))


def cmd_convert(a: argparse.Namespace) -> int:
    report = convert(
        a.source,
        a.dest,
        a.collection,
        clinical=a.clinical,
        overrides=a.overrides,
        storage_options=_storage_options(a.storage_option),
        source_options=_storage_options(a.source_option),
        scheduler=a.scheduler,
        workers=a.workers,
        progress=not a.quiet,
        overwrite=a.overwrite,
        only=a.only,
        where=a.where,
        keep_descriptions=a.keep_descriptions,
        clinical_columns=a.clinical_column,
    )
    print(report.summary())
    if report.fatal:
        print(f"livercube: error: {report.fatal}", file=sys.stderr)
    return report.exit_code


def cmd_synth(a: argparse.Namespace) -> int:
    from livercube.synth import collections as synth

    out = synth.write_examples(
        Path(a.dest), collections=a.collection, n=a.subjects, size=a.size, seed=a.seed
    )
    for name, path in out.items():
        print(f"{name}: {path}")
    return EXIT_OK


def cmd_info(a: argparse.Namespace) -> int:
    import pandas as pd

    import livercube
    from livercube.store.query import catalog_frame, select

    store = livercube.open(_store(a))
    cat = store.catalog
    table = select(catalog_frame(cat), a.where)
    rows = table.index.to_numpy()
    table["extent"] = ["x".join(str(int(v)) for v in row) for row in cat["extent"].values[rows]]
    table["spacing_mm"] = ["x".join(f"{v:g}" for v in r) for r in cat["spacing"].values[rows]]
    columns = ["path", "phase", "annotated", "extent", "spacing_mm"]
    with pd.option_context("display.max_rows", None, "display.width", 160):
        print(table[columns].to_string(index=False))
    print(f"{len(table)} of {cat.sizes['volume']} volumes")
    return EXIT_OK


def cmd_catalog(a: argparse.Namespace) -> int:
    from livercube.store import lease
    from livercube.store.catalog import write_catalog
    loc = _store(a)
    if not loc.is_remote and not Path(loc.url).is_dir():
        raise UsageError(f"{a.url}: no such store")
    with lease.held(loc, purpose="livercube catalog"):
        ds = write_catalog(loc)
    print(f"catalog rebuilt: {ds.sizes['volume']} complete volumes")
    return EXIT_OK


def cmd_preview(a: argparse.Namespace) -> int:
    import livercube
    from livercube.preview import volume_preview

    store = livercube.open(_store(a))
    if a.contact_sheets:
        from livercube.preview import contact_sheets

        for png in contact_sheets(
            store,
            a.contact_sheets,
            where=a.where,
            max_per_sheet=a.max_per_sheet,
            columns=a.columns,
        ):
            print(png)
        return EXIT_OK
    keys = a.volumes or list(range(min(a.max, store.catalog.sizes["volume"])))
    keys = [int(k) if isinstance(k, str) and k.isdigit() else k for k in keys]
    print(volume_preview(store, keys, a.out))
    return EXIT_OK


def cmd_demo(a: argparse.Namespace) -> int:
    from livercube.demo import run_demo

    return run_demo(Path(a.workdir), size=a.size, scheduler=a.scheduler)


def cmd_ls(a: argparse.Namespace) -> int:
    import pandas as pd

    import livercube
    from livercube.store.query import catalog_frame, select

    store = livercube.open(_store(a))
    table = catalog_frame(store.catalog)
    total = len(table)
    table = select(table, a.where)
    columns = ["path", "phase", "annotated"] + [
        c.strip() for c in (a.columns or "").split(",") if c.strip()
    ]
    unknown = [c for c in columns if c not in table.columns]
    if unknown:
        raise UsageError(f"--columns: no such catalog column(s): {', '.join(unknown)}")
    with pd.option_context("display.max_rows", None, "display.width", 160):
        print(table[columns].to_string(index=False) if len(table) else "(no volumes)")
    print(f"{len(table)} of {total} volumes")
    return EXIT_OK


def cmd_verify(a: argparse.Namespace) -> int:
    from livercube.store.verify import verify

    report = verify(
        _store(a),
        source=a.source,
        collection=a.collection,
        clinical=a.clinical,
        overrides=a.overrides,
        source_options=_storage_options(a.source_option),
        workers=a.workers,
    )
    print(report.to_json() if a.json else report.summary())
    return report.exit_code


def cmd_publish(a: argparse.Namespace) -> int:
    from livercube.store.publish import publish

    print(publish(_store(a)).summary())
    return EXIT_OK


def cmd_export(a: argparse.Namespace) -> int:
    from livercube.export import export

    phases = [p.strip() for p in (a.phases or "").split(",") if p.strip()] or None
    result = export(
        _store(a),
        a.dest,
        a.format,
        where=a.where,
        segments=a.segments,
        phases=phases,
        interpolation=a.interpolation,
        overwrite=a.overwrite,
    )
    print(result.summary())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livercube", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a collection into a store (local path or URL)")
    c.add_argument("source", help="collection root (local path or fsspec URL)")
    c.add_argument("dest", help="store URL: a path, s3://bucket/prefix, …")
    c.add_argument("--collection", required=True, type=_collection)
    c.add_argument(
        "--clinical", help="clinical spreadsheet / patient_data.csv (default: found in SOURCE)"
    )
    c.add_argument("--overrides", help="per-volume overrides CSV (PLC-CECT slice order, spacing)")
    c.add_argument(
        "--scheduler",
        default="threads",
        help="threads (default), local (process LocalCluster) or tcp://HOST:PORT",
    )
    c.add_argument("--workers", type=int, default=None)
    c.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec option for DEST, e.g. endpoint_url=http://127.0.0.1:9000",
    )
    c.add_argument(
        "--source-option",
        action="append",
        metavar="KEY=VALUE",
        help="fsspec option for SOURCE, e.g. anon=true",
    )
    c.add_argument(
        "--overwrite", action="store_true", help="rewrite complete, unchanged volumes too"
    )
    c.add_argument("--only", nargs="+", metavar="PATIENT", help="convert only these patients")
    c.add_argument(
        "--where",
        metavar="EXPR",
        help="with an idc:// source: series to take from the IDC index, e.g. "
        "\"PatientID in ['HCC_001', 'HCC_002']\"",
    )
    c.add_argument(
        "--keep-descriptions",
        action="store_true",
        help="store DICOM Study/SeriesDescription, ContrastBolusAgent … verbatim instead of "
        "cleaned (DICOM PS3.15 Clean Descriptors); only for already de-identified sources",
    )
    c.add_argument(
        "--clinical-column",
        action="append",
        metavar="NAME",
        help="also store this undocumented clinical spreadsheet column (repeatable; columns "
        "whose names look identifying are never stored)",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("synth", help="write miniature example collections in their real forms")
    s.add_argument("dest")
    s.add_argument(
        "--collection", action="append", type=_collection, help="repeatable; default all"
    )
    s.add_argument("--subjects", type=int, default=3)
    s.add_argument("--size", default="tiny", choices=("tiny", "small", "full"))
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    d = sub.add_parser("demo", help="synthesize examples, convert them, summarize, write a preview")
    d.add_argument("--workdir", default="livercube-demo")
    d.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    d.add_argument("--scheduler", default="threads")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="print the catalog as a table")
    i.add_argument("url")
    i.add_argument("--where", help="pandas query on the table, e.g. \"phase == 'arterial'\"")
    i.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("catalog", help="rebuild the catalog from the volumes' own metadata")
    k.add_argument("url")
    k.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    k.set_defaults(func=cmd_catalog)

    v = sub.add_parser("preview", help="PNG of axial/coronal/sagittal slices with labels")
    v.add_argument("url")
    v.add_argument("--out", default="preview.png")
    v.add_argument("--volumes", nargs="*", help="paths or indices (default: the first --max)")
    v.add_argument("--max", type=int, default=4)
    v.add_argument(
        "--contact-sheets",
        metavar="DIR",
        help="instead: one PNG per collection in DIR, an axial thumbnail per volume "
        "(coarsest browse level)",
    )
    v.add_argument("--where", help="with --contact-sheets: pandas query on the catalog")
    v.add_argument("--max-per-sheet", type=int, default=48, help="more volumes -> more pages")
    v.add_argument("--columns", type=int, default=8)
    v.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    v.set_defaults(func=cmd_preview)

    ls = sub.add_parser("ls", help="list the catalog's volumes, filtered by a pandas query")
    ls.add_argument("url")
    ls.add_argument(
        "--where", help="pandas query on the catalog, e.g. \"phase == 'arterial' and annotated\""
    )
    ls.add_argument("--columns", help="extra catalog columns to show, comma-separated")
    ls.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    ls.set_defaults(func=cmd_ls)

    vf = sub.add_parser(
        "verify",
        help="re-read every volume, recompute checksums, find damaged or missing shards",
        description="Exit status: 0 nothing wrong, 4 damage or source mismatches found, "
        "2 usage errors, 1 anything else.",
    )
    vf.add_argument("url")
    vf.add_argument("--source", help="also compare voxel for voxel with this collection root")
    vf.add_argument("--collection", type=_collection, help="collection of --source")
    vf.add_argument("--clinical", help="clinical spreadsheet used at conversion (with --source)")
    vf.add_argument("--overrides", help="overrides CSV used at conversion (with --source)")
    vf.add_argument("--source-option", action="append", metavar="KEY=VALUE")
    vf.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    vf.add_argument("--workers", type=int, default=4, help="volumes checked concurrently")
    vf.add_argument("--json", action="store_true", help="print the full report as JSON")
    vf.set_defaults(func=cmd_verify)

    pb = sub.add_parser(
        "publish",
        help="consolidate metadata, export catalog.parquet, write the README.md dataset card",
    )
    pb.add_argument("url")
    pb.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    pb.set_defaults(func=cmd_publish)

    ex = sub.add_parser(
        "export",
        help="write volumes as NIfTI files or as an nnU-Net v2 raw dataset",
        description="nifti: DEST/<volume path>/image.nii.gz, label.nii.gz (+ segments/). "
        "nnunet: DEST/dataset.json, imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz "
        "(annotated volumes only). Voxels unchanged, affine = the store's grid in RAS.",
    )
    ex.add_argument("url", help="store URL")
    ex.add_argument("dest", help="local output directory (nnunet: e.g. $nnUNet_raw/Dataset501_X)")
    ex.add_argument("--format", required=True, choices=("nifti", "nnunet"))
    ex.add_argument("--where", help="pandas query on the catalog, as for `ls`")
    ex.add_argument("--segments", action="store_true", help="nifti: also one mask per segment")
    ex.add_argument(
        "--phases",
        metavar="A,B",
        help="nnunet: one case per study, these phases resampled onto the annotated volume's "
        "grid as channels _0000, _0001, …",
    )
    ex.add_argument("--interpolation", default="linear", choices=("linear", "nearest"))
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in DEST")
    ex.add_argument("--storage-option", action="append", metavar="KEY=VALUE")
    ex.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"livercube: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LivercubeError as exc:
        print(f"livercube: {exc}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
