"""Reads meterd's embedded store the way the README shows, with DuckDB, pandas and polars.

Usage: read_parquet.py DATA_DIR

Prints {"duckdb": {...}, "pandas": {...}, "polars": {...}, "manifest": {...}}: for each reader
the number of rows, distinct (tenant, id) keys and the sum of input_tokens it sees under
DATA_DIR/events, and the same from the files `_manifest.json` lists.
"""

import json
import os
import sys

import duckdb
import pandas as pd
import polars as pl


def main():
    events = os.path.join(sys.argv[1], "events")
    glob = os.path.join(events, "*", "*.parquet")
    out = {}

    # DuckDB reads the day=YYYY-MM-DD folders as a hive partition column `day`.
    row = duckdb.sql(
        f"SELECT count(*), count(DISTINCT (tenant, id)), sum(input_tokens) "
        f"FROM read_parquet('{glob}')"
    ).fetchall()[0]
    out["duckdb"] = {"rows": row[0], "keys": row[1], "input_tokens": int(row[2] or 0)}

    frame = pd.read_parquet(events, engine="pyarrow")
    out["pandas"] = {
        "rows": len(frame),
        "keys": int(frame[["tenant", "id"]].drop_duplicates().shape[0]),
        "input_tokens": int(frame["input_tokens"].sum()),
    }

    lazy = pl.scan_parquet(glob)
    summary = lazy.select(
        pl.len().alias("rows"),
        pl.struct("tenant", "id").n_unique().alias("keys"),
        pl.col("input_tokens").sum().alias("input_tokens"),
    ).collect()
    out["polars"] = {k: int(summary[k][0]) for k in ("rows", "keys", "input_tokens")}

    with open(os.path.join(events, "_manifest.json")) as f:
        manifest = json.load(f)
    listed = [os.path.join(events, f["path"]) for f in manifest["files"]]
    row = duckdb.execute(
        "SELECT count(*) FROM read_parquet(?)", [listed]
    ).fetchall()[0] if listed else (0,)
    out["manifest"] = {"files": len(listed), "rows": row[0],
                       "rows_listed": sum(f["rows"] for f in manifest["files"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
