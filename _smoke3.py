import torch, network
from utils.config import load_config
from utils.inference import Inference
from utils.inference.memory import trace_forward, LiveTensorBytes, predict_eval_peak, tensor_bytes
from utils.inference.multiscale import Schedule, ScheduledPass, network_fn, UNCONSTRAINED
cfg = load_config(None)
torch.manual_seed(0)
model = network.build_model(cfg.model.name, 19, **cfg.model.options).eval()
fn = network_fn(model)
with torch.inference_mode():
  for shp in [(2,3,128,192),(2,3,64,96),(2,3,32,48)]:
    x = torch.randn(shp)
    with LiveTensorBytes() as t: out = fn(x)
    print(shp, t.peak, trace_forward(model, shp).peak)
  how = Inference.make([0.5,1.0,2.0], flip=True)
  combos=[how.combo(model)]
  x = torch.randn(2,3,64,96)
  for sch in [UNCONSTRAINED, Schedule(stream=True)]:
    with LiveTensorBytes() as t:
        if sch == UNCONSTRAINED:
            r = how.run(model, x, combos); l = r.logits(combos[0])
        else:
            r = ScheduledPass(model, x, combos, sch); l = r.logits(combos[0])
        del r, l
    static = tensor_bytes(model)+x.numel()*4
    print(sch.label, static+t.peak, predict_eval_peak(model, x.shape, combos, how, sch, (), labelled=False))
