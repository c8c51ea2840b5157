"""Profiles: HLO op names read as model scopes, and traces that hold exactly the steps asked for
(the train loop's in test_training.py, the bench's in test_bench.py)."""
import logging
import textwrap
import types

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from vit_jax.training import profiling


@pytest.mark.parametrize('op_name, expected', [
    ('jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/encoderblock_6/MlpBlock_3/'
     'Dense_0/dot_general',
     ('backward', 'VisionTransformer/Transformer/encoderblock_*/MlpBlock_3/Dense_0/dot_general')),
    ('jit(train_step)/jvp(VisionTransformer)/Transformer/encoderblock_11/LayerNorm_0/reduce_sum',
     ('forward', 'VisionTransformer/Transformer/encoderblock_*/LayerNorm_0/reduce_sum')),
    ('jit(eval_step)/VisionTransformer/head/dot_general',
     ('forward', 'VisionTransformer/head/dot_general')),
    ('jit(train_step)/transpose(jvp(VisionTransformer))/block2/unit3/conv2/conv_general_dilated',
     ('backward', 'VisionTransformer/block*/unit*/conv2/conv_general_dilated')),  # Hybrid stem.
    ('jit(train_step)/add', ('other', 'add')),  # The optimizer, outside the model.
    ('jit(train_step)/(transpose(jvp(VisionTransformer))/head/reduce_sum',  # Combined op.
     ('backward', 'VisionTransformer/head/reduce_sum')),
    # Jitted library functions, named by call site and function; after the function's name
    # comes the name stack of its first (cached) trace, here from another call site.
    ('jit(train_step)/jit(_threefry_fold_in)/PatchEmbedding.__call__/while',
     ('other', '_threefry_fold_in')),  # The step's own rng, outside the model.
    ('jit(train_step)/jvp(VisionTransformer)/Transformer/encoderblock_3/Dropout_0/'
     'jit(_threefry_fold_in)/PatchEmbedding.__call__/while/body/closed_call/add',
     ('forward', 'VisionTransformer/Transformer/encoderblock_*/Dropout_0/_threefry_fold_in')),
])
def test_scope_of_names_the_model_scope(op_name, expected):
  assert profiling.scope_of(op_name) == expected


# The shape of the default model's compiled train step (jax 0.10.2, CPU): fusions without an
# op_name, XLA's own names, a max-pool gradient's iota that no jax op emitted, and the two
# devices' gradient all-reduces that XLA combined into one.
_UNNAMED_FUSIONS = '''HloModule jit_train_step

%fused_computation.718 (param_0.1: f32[32], param_1.2: f32[32]) -> f32[32] {
  %param_0.1 = f32[32]{0} parameter(0)
  %broadcast.1518 = f32[32]{0} broadcast(%param_0.1), dimensions={}, metadata={op_name="broadcast.211"}
  %multiply.855 = f32[32]{0} multiply(%param_0.1, %broadcast.1518), metadata={op_name="jit(train_step)/jvp(VisionTransformer)/block1/unit1/conv1/conv1.param/div" stack_frame_id=111}
  %param_1.2 = f32[32]{0} parameter(1)
  ROOT %sub.1067 = f32[32]{0} subtract(%param_1.2, %multiply.855), metadata={op_name="jit(train_step)/jvp(VisionTransformer)/block1/unit1/conv1/conv1.param/sub" stack_frame_id=112}
}

%wrapped_iota_computation.1 () -> s32[16,15] {
  ROOT %iota.18 = s32[16,15]{1,0} iota(), iota_dimension=0
}

ENTRY %main.9 (param.5: f32[32], param.6: f32[32]) -> f32[32] {
  %param.5 = f32[32]{0} parameter(0)
  %param.6 = f32[32]{0} parameter(1)
  %transpose_copy_fusion.4 = f32[32]{0} fusion(%param.5, %param.6), kind=kLoop, calls=%fused_computation.718
  %wrapped_iota.1 = s32[16,15]{1,0} fusion(), kind=kLoop, calls=%wrapped_iota_computation.1
  %all-reduce.7 = (f32[32]{0}, f32[32]{0}) all-reduce(%param.5, %param.6), replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(train_step)/transpose(jvp(VisionTransformer))/head/reduce_sum:jit(train_step)/transpose(jvp(VisionTransformer))/Transformer/encoderblock_0/LayerNorm_0/reduce_sum:jit(train_step)/add"}
  ROOT %add.3 = f32[32]{0} add(%transpose_copy_fusion.4, %param.6), metadata={op_name="broadcast.209"}
}
'''


def test_fusions_xla_left_unnamed_take_their_computations_name():
  """They were 26% of the default model's op time as 'other unattributed'."""
  scopes = profiling.op_scopes(_UNNAMED_FUSIONS)
  assert scopes['transpose_copy_fusion.4'] == (  # Its root's name.
      'forward', 'VisionTransformer/block*/unit*/conv1/conv1.param/sub')
  assert scopes['wrapped_iota.1'] == ('other', 'made by XLA: iota')
  assert scopes['add.3'] == ('other', 'made by XLA: add')  # XLA's own op_name, not a scope.
  # The gradients' all-reduces, combined by XLA into one, named by the first of them.
  assert scopes['all-reduce.7'] == (
      'backward', 'all-reduce of 3: VisionTransformer/head/reduce_sum, ...')


def _grad_step():
  def loss(params, x):
    with jax.named_scope('MlpBlock'):
      hidden = jnp.tanh(x @ params['in'])
    return (hidden @ params['out']).sum()
  params = {'in': jnp.ones((256, 512)) / 256, 'out': jnp.ones((512, 8))}
  x = jnp.ones((128, 256))
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  return (lambda: compiled(params, x)), compiled.as_text()


def test_summary_attributes_the_ops_of_exactly_the_traced_steps(tmp_path):
  run, hlo_text = _grad_step()
  trace = profiling.trace(run, steps=3, logdir=str(tmp_path))
  assert profiling.traced_steps(trace, 'jit_loss') == 3
  rows = profiling.summarize(trace, hlo_text)
  assert rows and all(row['ms_per_step'] > 0 and 0 < row['share'] <= 1 for row in rows)
  assert sum(row['share'] for row in rows) == pytest.approx(1.0)  # Fewer than `top` scopes.
  directions = {(row['direction'], row['scope']) for row in rows}
  # The forward product inside the named scope and its weight gradient outside it.
  assert ('forward', 'MlpBlock/dot_general') in directions
  assert any(d == 'backward' for d, _ in directions)
  assert 'ms/step' in profiling.format_summary(rows)


def _event(name, ms, /, **stats):  # A stat may be called name.
  return types.SimpleNamespace(name=name, duration_ns=ms * 1e6, stats=list(stats.items()))


def _plane(name, *events):
  return types.SimpleNamespace(name=name, lines=[types.SimpleNamespace(events=list(events))])


_MLP_HLO = textwrap.dedent("""\
    HloModule jit_loss
    ENTRY %main {
      %dot.1 = f32[8] dot(%a, %b), metadata={op_name="jit(loss)/MlpBlock/dot_general"}
      %tanh.2 = f32[8] tanh(%dot.1), metadata={op_name="jit(loss)/MlpBlock/tanh"}
      %all-reduce.3 = f32[8] all-reduce(%tanh.2), metadata={op_name="jit(loss)/MlpBlock/psum"}
    }""")


def test_summary_reads_gpu_kernels_by_their_hlo_op_and_skips_host_launches(monkeypatch):
  """The shape of a real H200 trace (jax 0.11.2), hand-made with 2 steps: a kernel event is named
  by the kernel, its HLO op is a stat, it carries no run_id (the host's launch of the module
  does), and the host plane holds launches of the same ops. A kernel inside a CUDA graph is
  named by the graph (hlo_op 'command_buffer_1'): unattributed."""
  launches = [_event('CommonPjRtLoadedExecutable::Execute (jit_loss)', 9.0, run_id=run,
                    name='jit_loss') for run in (7, 8)]
  planes = [_plane('/host:CPU', _event('dot.1', 50.0, hlo_op='dot.1', hlo_module='jit_loss'),
                   *launches),
            _plane('/device:GPU:0', *[_event(kernel, ms, hlo_op=op, hlo_module='jit_loss')
                                     for _ in launches
                                     for kernel, op, ms in [('sm90_xmma_gemm_bf16', 'dot.1', 3.0),
                                                            ('loop_tanh_fusion', 'tanh.2', 1.0),
                                                            ('memcpy', 'copy.9', 0.5),
                                                            ('loop_add_fusion', 'command_buffer_1',
                                                             0.25)]])]
  monkeypatch.setattr(profiling.ProfileData, 'from_file',
                      lambda path: types.SimpleNamespace(planes=planes))
  rows = {(row['direction'], row['scope']): (row['ms_per_step'], row['ops_per_step'])
          for row in profiling.summarize('trace.xplane.pb', _MLP_HLO)}
  assert rows == {('forward', 'MlpBlock/dot_general'): (3.0, 1),
                  ('forward', 'MlpBlock/tanh'): (1.0, 1), ('other', 'unattributed'): (0.75, 2)}
  assert profiling.traced_steps('trace.xplane.pb', 'jit_loss') == 2


def test_a_stalled_cpu_step_does_not_swell_the_op_that_waited_for_it(monkeypatch):
  """The shape of a traced ViT-Ti/16 step on two CPU devices: each op names its step (run_id);
  in one of three steps device 1's ops ran 2.3x slower (tracing stalls a device now and then),
  and device 0 waited for it inside the gradients' all-reduce. Each scope's median over the
  steps is reported."""
  def device_ops(run_id, slowdown, all_reduce_ms):
    return [_event(op, ms, hlo_op=op, hlo_module='jit_loss', run_id=run_id)
            for op, ms in [('dot.1', 600.0 * slowdown), ('tanh.2', 100.0 * slowdown),
                           ('all-reduce.3', all_reduce_ms)]]
  planes = [_plane('/host:CPU', *device_ops(1, 1.0, 10.0), *device_ops(1, 1.0, 12.0),
                   *device_ops(2, 1.0, 950.0), *device_ops(2, 2.3, 11.0),  # The stalled step.
                   *device_ops(3, 1.0, 12.0), *device_ops(3, 1.0, 10.0))]
  monkeypatch.setattr(profiling.ProfileData, 'from_file',
                      lambda path: types.SimpleNamespace(planes=planes))
  rows = {row['scope']: (row['ms_per_step'], row['ops_per_step'], row['share'])
          for row in profiling.summarize('trace.xplane.pb', _MLP_HLO)}
  assert rows['MlpBlock/dot_general'] == pytest.approx((1200.0, 2, 1200 / 1422))
  assert rows['MlpBlock/tanh'] == pytest.approx((200.0, 2, 200 / 1422))
  assert rows['MlpBlock/psum'] == pytest.approx((22.0, 2, 22 / 1422))  # Not (22 + 961) / 3.


def test_the_train_profiler_is_off_by_default_and_skips_runs_too_short(caplog):
  config = ml_collections.ConfigDict({'total_steps': 8, 'profile_steps': 0,
                                      'profile_skip_steps': 5})
  assert profiling.train_profiler(config, '/nonexistent', start_step=0) is None
  config.profile_steps = 3
  with caplog.at_level(logging.WARNING):
    assert profiling.train_profiler(config, '/nonexistent', start_step=4) is None
  assert 'no profile' in caplog.text
  with caplog.at_level(logging.WARNING):
    assert profiling.train_profiler(config, '/nonexistent', start_step=3) is None  # Ends at 8.
  profiler = profiling.train_profiler(config, '/nonexistent', start_step=0)
  assert (profiler.first_step, profiler.last_step) == (5, 8)  # Traces steps 6, 7 and 8.
  config.profile_steps, config.profile_skip_steps = 10, 0
  profiler = profiling.train_profiler(config, '/nonexistent', start_step=2)
  assert (profiler.first_step, profiler.last_step) == (3, 8)  # Not step 3: it compiles.
