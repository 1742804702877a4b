import numpy as np
import pytest

from data import OPERATIONS, DataConfig, modular_arithmetic, split


def expected_label(a, b, op, p):
    return {"+": (a + b) % p, "-": (a - b) % p, "*": (a * b) % p, "/": (a * pow(b, p - 2, p)) % p}[op]


@pytest.mark.parametrize("p", [2, 7, 97])
@pytest.mark.parametrize("op", OPERATIONS)
def test_labels_match_python_modular_arithmetic(p, op):
    tokens, labels = modular_arithmetic(DataConfig(p=p, op=op))
    assert tokens.shape == (DataConfig(p=p, op=op).num_examples, 4) and tokens.dtype == np.int32
    for (a, op_token, b, eq_token), label in zip(tokens.tolist(), labels.tolist()):
        assert (op_token, eq_token) == (p, p + 1)
        assert label == expected_label(a, b, op, p)


def test_division_excludes_zero_divisor_and_inverts_multiplication():
    p = 13
    tokens, labels = modular_arithmetic(DataConfig(p=p, op="/"))
    assert tokens[:, 2].min() == 1 and len(tokens) == p * (p - 1)
    assert np.all((labels.astype(np.int64) * tokens[:, 2]) % p == tokens[:, 0])


def test_every_pair_appears_once():
    tokens, _ = modular_arithmetic(DataConfig(p=11, op="+"))
    pairs = {(a, b) for a, _, b, _ in tokens.tolist()}
    assert pairs == {(a, b) for a in range(11) for b in range(11)}


def test_large_prime_division_does_not_overflow():
    p = 65521  # (p-1)^2 overflows int32; labels must still satisfy label * b = a
    b = np.arange(1, 200, dtype=np.int64)
    from data import modular_power
    assert np.all(b * modular_power(b, p - 2, p) % p == 1)
    assert DataConfig(p=7919, op="/").vocab_size == 7919 + 2


def test_a_dataset_too_large_for_memory_is_rejected_before_it_is_built():
    with pytest.raises(ValueError, match=r"data.p=65521 makes 4,292,935,920 examples, about .* GiB to build"):
        DataConfig(p=65521, op="/")


def test_split_is_disjoint_complete_and_seeded():
    cfg = DataConfig(p=11, op="-", train_fraction=0.3)
    x_train, y_train, x_val, y_val = split(cfg, np.random.default_rng(0))
    assert len(x_train) == int(0.3 * 121) and len(x_train) + len(x_val) == 121
    train_rows, val_rows = set(map(tuple, x_train.tolist())), set(map(tuple, x_val.tolist()))
    assert not train_rows & val_rows and len(train_rows | val_rows) == 121
    again = split(cfg, np.random.default_rng(0))
    other = split(cfg, np.random.default_rng(1))
    assert all(np.array_equal(u, v) for u, v in zip((x_train, y_train, x_val, y_val), again))
    assert not np.array_equal(x_train, other[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(p=12, op="/"), "p=12 must be prime"),
    (dict(p=1, op="+"), "p=1 must be >= 2"),
    (dict(op="%"), "op='%' is not supported"),
    (dict(train_fraction=0.0), "train_fraction=0.0 must be in (0, 1)"),
    (dict(train_fraction=1.0), "train_fraction=1.0 must be in (0, 1)"),
    (dict(p=3, op="+", train_fraction=0.05), "leaves an empty split"),
    (dict(p=5, op="*", train_fraction=0.03), "leaves an empty split"),
])
def test_bad_data_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DataConfig(**kwargs)


def test_non_prime_modulus_is_fine_without_division():
    tokens, labels = modular_arithmetic(DataConfig(p=12, op="*"))
    assert labels.max() < 12 and len(tokens) == 144
