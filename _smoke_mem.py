import time, torch, network
from utils.config import load_config
from utils.inference import Inference
from utils.inference.memory import plan_eval, PeakMemory, tensor_bytes
from utils.inference.multiscale import UNCONSTRAINED, Schedule, ScheduledPass, MultiScalePass
from utils.engine import evaluate
cfg = load_config(None)
print(cfg.model.name, cfg.model.options)
torch.manual_seed(0)
model = network.build_model(cfg.model.name, 19, **cfg.model.options).eval()
how = Inference.make([0.5,1.0,2.0], flip=True, sweep_sets=[[0.5,1.0],[1.0,2.0]])
setting = how.combo(model); combos=[setting]+[c for c in how.sweep(model) if c!=setting]
x = torch.randn(2,3,64,96); t = torch.randint(0,19,(2,64,96))
t0=time.time()
plan = plan_eval(model, x.shape, combos, how, "cpu", keep=(), every=True)
print("plan s", time.time()-t0)
with torch.inference_mode():
    ref = MultiScalePass(model, x, [2.0,1.0,0.5], True)
    refl = {c: ref.logits(c) for c in combos}; refm = ref.maps(setting.scales)
    for row in plan.rows:
        sp = ScheduledPass(model, x, combos, row.schedule, setting.scales) if row.schedule != UNCONSTRAINED else ref
        same = all(torch.equal(sp.logits(c), refl[c]) for c in combos) and all(torch.equal(v, refm[k]) for k,v in sp.maps(setting.scales).items())
        loader=[{"image":x,"mask":t,"name":["a","b"]}]
        h = Inference.make([0.5,1.0,2.0], flip=True, sweep_sets=[[0.5,1.0],[1.0,2.0]], schedule=row.schedule)
        with PeakMemory(torch.device("cpu")) as m:
            evaluate(model, loader, 19, 255, h, torch.device("cpu"))
        meas = tensor_bytes(model)+x.numel()*4+t.numel()*8+m.peak
        print(row.schedule.label, same, row.peak, meas, row.peak/meas-1)
