"""scripts/xla_cpu_profile.py on a hand-written HLO dump and trace: each
instruction in its class, milliseconds per step from the thunks' times."""

import gzip
import importlib.util
import json
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'xla_cpu_profile.py'
spec = importlib.util.spec_from_file_location('xla_cpu_profile', SCRIPT)
profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile)

HLO = '''HloModule jit_train_step

%fused_computation.1 (p: f32[2]) -> f32[2] {
  %inner = f32[2]{0} negate(%p), metadata={op_name="jit(train_step)/jvp(ResNet)/stage1/neg"}
}

ENTRY %main {
  %a = f32[16,56,56,64]{3,2,1,0} fusion(%x), kind=kLoop, metadata={op_name="jit(train_step)/jvp(ResNet)/reduce_window_max"}
  %b = f32[16,112,112,64]{3,2,1,0} fusion(%x), kind=kLoop, metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/select_n"}
  %wrapped_iota = s32[16,114,114,64]{3,2,1,0} fusion(), kind=kLoop
  %c = f32[16,56,56,64]{3,2,1,0} convolution(%x, %k), metadata={op_name="jit(train_step)/jvp(ResNet)/stage1_block0/conv1/conv_general_dilated"}
  %d = f32[16,56,56,64]{3,2,1,0} convolution(%x, %k), metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/stage1_block0/conv1/conv_general_dilated"}
  %ynn_fusion.3 = f32[64,3,3,64]{3,2,1,0} fusion(%x, %y), kind=kCustom
  %transpose_copy_fusion = f32[64,56,56,16]{3,2,1,0} fusion(%x), kind=kLoop
  %e = f32[16,28,28,128]{3,2,1,0} dot(%x, %w), metadata={op_name="jit(train_step)/jvp(ResNet)/b/proj_conv/dot_general"}
  ROOT %f = f32[64]{0} fusion(%x), kind=kLoop, metadata={op_name="jit(train_step)/add"}
  %g = f32[16,28,28,8]{3,2,1,0} convolution(%x, %k), metadata={op_name="jit(accumulate)/vmap(transpose(vmap(jvp(ResNet))))/stage1_block0/conv1/conv_general_dilated"}
  %concatenate_fusion = f32[16,3,3,1,8,28,28]{6,5,4,3,2,1,0} fusion(%x), kind=kLoop, metadata={op_name="jit(accumulate)/vmap(transpose(vmap(jvp(ResNet))))/stage1_block0/conv1/per_example_filter_grad/stack"}
}
'''
CLASSES = {'a': 'max pool forward', 'b': 'max pool gradient', 'wrapped_iota': 'max pool gradient',
           'c': 'conv forward', 'd': 'conv input gradient',
           'ynn_fusion.3': 'conv filter gradient', 'transpose_copy_fusion': 'transposes and copies',
           'e': '1x1 conv (dot) forward', 'f': 'elementwise, reductions, optimizer',
           # DP-SGD's per-example gradients (vmapped), layers.conv's filter gradient.
           'g': 'conv input gradient', 'concatenate_fusion': 'conv filter gradient'}


def test_classes_and_milliseconds_per_step(tmp_path, capsys, monkeypatch):
  (tmp_path / 'dump').mkdir()
  (tmp_path / 'dump' / 'module_0001.jit_train_step.cpu_after_optimizations.txt').write_text(HLO)
  hlo = profile.instructions(str(tmp_path / 'dump'))
  assert 'inner' not in hlo  # Only the entry computation's thunks.
  assert {name: profile.classify(name, *hlo[name], 16) for name in CLASSES} == CLASSES

  trace = tmp_path / 'trace' / 'plugins' / 'profile' / 'run'
  trace.mkdir(parents=True)
  events = [{'ph': 'X', 'name': name, 'dur': 1000.0 * (i + 1)} for i, name in enumerate(CLASSES)]
  events.append({'ph': 'X', 'name': '$python frame', 'dur': 1e9})  # Not a thunk: left out.
  with gzip.open(trace / 'perfetto_trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)
  monkeypatch.setattr('sys.argv', ['xla_cpu_profile.py', str(tmp_path / 'dump'),
                                   str(tmp_path / 'trace'), '--steps', '2', '--batch-size', '16'])
  profile.main()
  rows = {line.split(' | ')[0].strip('| '): line.split(' | ')[1]
          for line in capsys.readouterr().out.splitlines()[2:]}
  # Thunk i takes i + 1 ms, over 2 steps: the pool's gradient is thunks 2 and 3.
  assert rows['max pool gradient'] == '2' and rows['conv filter gradient'] == f'{(6 + 11) / 2:.0f}'
  assert rows['all thunks'] == f'{sum(range(1, 12)) / 2:.0f}'
