"""Length bucketing in feature extraction: rows sorted by length, embedded a batch at a time, each
batch padded to its own longest row, and the features put back in the rows' order."""

import numpy as np
import pyarrow as pa
import torch
import transformers

from trainers.features.extract import embed, embed_rows, rows_per_call
from trainers.model import PRESETS


def test_bucketed_features_equal_an_unpadded_forward_of_each_row():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=128, **PRESETS["tiny-bert"]))
    model.eval()
    rng = np.random.default_rng(0)
    rows = [rng.integers(5, 128, size=n).tolist() for n in rng.integers(1, 40, size=29)]
    # As Ray Data hands them over: several chunks, one of them a slice (a non-zero offset).
    ids = pa.chunked_array([pa.array(rows[:15]), pa.array([[1, 2]] + rows[15:]).slice(1)])
    for pooling, layer in (("mean", -1), ("cls", -1), ("last_token", 1)):
        got = embed_rows(model, ids, pad_id=0, pooling=pooling, layer=layer, batch_size=8)
        assert got.shape == (29, 64) and got.dtype == np.float32
        with torch.inference_mode():
            for i, row in enumerate(rows):
                x = torch.tensor([row])
                alone = embed(model, x, torch.ones_like(x), pooling, layer)[0].numpy()
                np.testing.assert_allclose(
                    got[i], alone, atol=1e-5, rtol=0, err_msg=f"{pooling} {i}"
                )
    empty = embed_rows(model, pa.array([], type=pa.list_(pa.int64())), 0, "mean", -1, 8)
    assert empty.shape == (0, 64)


def test_rows_per_call_fills_every_actor_with_whole_batches():
    assert rows_per_call(batch_size=32, num_actors=1, rows=1200) == 512  # 16 forward batches
    assert rows_per_call(batch_size=32, num_actors=2, rows=320) == 160  # an even share each
    assert rows_per_call(batch_size=32, num_actors=3, rows=100) == 64  # rounded up to batches
    assert rows_per_call(batch_size=32, num_actors=4, rows=10) == 32
