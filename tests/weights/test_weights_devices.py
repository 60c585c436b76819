"""Device roles and model placement on 8 simulated CPU devices."""
import jax
import pytest

from crosspool_jax.weights.devices import DeviceRoles, parse_split, place_models, resolve_device_roles

DEVS = jax.devices()
# the CPU suite simulates 8 devices (tests/conftest.py); a GPU run (CROSSPOOL_TEST_ON_GPU=1) may have fewer
pytestmark = pytest.mark.skipif(len(DEVS) < 8, reason="needs the 8 simulated devices of the CPU suite")


def test_eight_devices():
    assert len(DEVS) == 8


@pytest.mark.parametrize("n_kv,n_w", [(1, 1), (2, 2), (4, 4), (6, 2)])
def test_crosspool_splits(n_kv, n_w):
    roles = resolve_device_roles("crosspool", n_kv, n_w)
    assert roles.kv_devices == tuple(DEVS[:n_kv])
    assert roles.weight_devices == tuple(DEVS[n_kv:n_kv + n_w])
    assert not set(roles.kv_devices) & set(roles.weight_devices)


def test_crosspool_defaults_and_degenerate():
    roles = resolve_device_roles("crosspool", None, None)
    assert roles.kv_devices == (DEVS[0],) and roles.weight_devices == (DEVS[1],)
    one = resolve_device_roles("crosspool", None, None, devices=DEVS[3:4])
    assert one.is_degenerate and one.kv_devices == one.weight_devices == (DEVS[3],)
    assert resolve_device_roles("crosspool", 1, 1, devices=DEVS[:1]).is_degenerate
    explicit = DeviceRoles((DEVS[5],), (DEVS[5],))
    assert explicit.is_degenerate and explicit.weight_devices == (DEVS[5],)


def test_explicit_lists_devices_or_ids():
    roles = resolve_device_roles("crosspool", [DEVS[7], DEVS[6]], [1, 2, 3])
    assert roles.kv_devices == (DEVS[7], DEVS[6])
    assert roles.weight_devices == (DEVS[1], DEVS[2], DEVS[3])
    # count after a list: the first devices not holding KV
    roles = resolve_device_roles("crosspool", [0, 1], 2)
    assert roles.weight_devices == (DEVS[2], DEVS[3])


def test_shared_and_static():
    shared = resolve_device_roles("shared", None, None)
    assert shared.kv_devices == shared.weight_devices == tuple(DEVS)
    four = resolve_device_roles("shared", 4, None)
    assert four.kv_devices == four.weight_devices == tuple(DEVS[:4])
    static = resolve_device_roles("static", None, 6)
    assert static.weight_devices == tuple(DEVS[:6])


def test_place_models_greedy_by_bytes():
    # largest first onto the least loaded device; ties keep the order given / the lowest index
    sizes = {"a": 10, "b": 40, "c": 30, "d": 25, "e": 10}
    assert place_models(sizes, 2) == {"b": 0, "c": 1, "d": 1, "a": 0, "e": 0}
    assert place_models(sizes, 8) == {"b": 0, "c": 1, "d": 2, "a": 3, "e": 4}
    assert place_models({"x": 5, "y": 5}, 1) == {"x": 0, "y": 0}
    assert place_models({"x": 5, "y": 5, "z": 5}, 2) == {"x": 0, "y": 1, "z": 0}
    with pytest.raises(ValueError, match="num_devices"):
        place_models(sizes, 0)
    with pytest.raises(ValueError, match="model 'x' has -1 bytes"):
        place_models({"x": -1}, 2)
    with pytest.raises(ValueError, match="no models"):
        place_models({}, 2)


def test_errors():
    with pytest.raises(ValueError, match=r"6 \+ weight_devices=4 = 10 devices asked.*only 8"):
        resolve_device_roles("crosspool", 6, 4)
    with pytest.raises(ValueError, match=r"kv_devices=9 .*\(8\)"):
        resolve_device_roles("crosspool", 9, 1)
    with pytest.raises(ValueError, match="overlap"):
        resolve_device_roles("crosspool", [0, 1], [1, 2])
    with pytest.raises(ValueError, match="overlap"):
        DeviceRoles(tuple(DEVS[:2]), tuple(DEVS[:2]))
    assert DeviceRoles(tuple(DEVS[:2]), tuple(DEVS[:2]), mode="shared").kv_devices == tuple(DEVS[:2])
    with pytest.raises(ValueError, match="twice"):
        DeviceRoles((DEVS[0], DEVS[0]), (DEVS[1],))
    with pytest.raises(ValueError, match="weight_devices must not be empty"):
        DeviceRoles((DEVS[0],), ())
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_device_roles("monolithic", 1, 1)
    with pytest.raises(ValueError, match="no device with id 42"):
        resolve_device_roles("crosspool", [42], 1)
    with pytest.raises(ValueError, match="kv_devices must be >= 1"):
        resolve_device_roles("crosspool", 0, 1)
    with pytest.raises(ValueError, match="must select the same devices"):
        resolve_device_roles("shared", 2, 4)
    with pytest.raises(ValueError, match="asks for more devices"):
        resolve_device_roles("static", 9, None)


def test_parse_split():
    assert parse_split("1+1") == (1, 1) and parse_split("6+2") == (6, 2)
    for bad in ("2", "0+1", "1+x", "+2"):
        with pytest.raises(ValueError, match="'KV\\+W' with two positive counts"):
            parse_split(bad)
