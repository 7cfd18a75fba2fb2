// Argument checks for AdamW: four equally long lists of f32 tensors, element counts agreeing
// index by index, no two of one index sharing memory; hyper-parameters in their valid ranges.
#include "op.h"

namespace mlora {

MLORA_OP(adamw) {
  std::vector<TensorImpl> params = a.tensor_list("params", {DType::F32});
  std::vector<TensorImpl> grads = a.tensor_list("grads", {DType::F32});
  std::vector<TensorImpl> m = a.tensor_list("m", {DType::F32});
  std::vector<TensorImpl> v = a.tensor_list("v", {DType::F32});
  const size_t count = params.size();
  for (auto [name, list] :
       {std::pair<const char*, const std::vector<TensorImpl>*>{"grads", &grads}, {"m", &m}, {"v", &v}})
    if (list->size() != count)
      a.fail(std::string("argument '") + name + "' has " + std::to_string(list->size()) + " tensors, 'params' has " +
             std::to_string(count));
  for (size_t i = 0; i < count; i++) {
    const std::string idx = "[" + std::to_string(i) + "]";
    const std::string pn = "params" + idx, gn = "grads" + idx, mn = "m" + idx, vn = "v" + idx;
    const int64_t n = params[i].numel();
    a.expect_numel(gn.c_str(), grads[i], n);
    a.expect_numel(mn.c_str(), m[i], n);
    a.expect_numel(vn.c_str(), v[i], n);
    a.expect_outputs_distinct({{pn.c_str(), &params[i]}, {mn.c_str(), &m[i]}, {vn.c_str(), &v[i]}},
                              {{gn.c_str(), &grads[i]}});
  }
  const double lr = a.number("lr"), beta1 = a.number("beta1"), beta2 = a.number("beta2"), eps = a.number("eps");
  const double wd = a.number("weightDecay"), gscale = a.number("gradScale", 1.0);
  const int64_t step = a.integer("step");
  if (lr < 0) a.fail("argument 'lr' must be >= 0, got " + std::to_string(lr));
  if (beta1 < 0 || beta1 >= 1) a.fail("argument 'beta1' must be in [0, 1), got " + std::to_string(beta1));
  if (beta2 < 0 || beta2 >= 1) a.fail("argument 'beta2' must be in [0, 1), got " + std::to_string(beta2));
  if (eps <= 0) a.fail("argument 'eps' must be > 0, got " + std::to_string(eps));
  if (wd < 0) a.fail("argument 'weightDecay' must be >= 0, got " + std::to_string(wd));
  if (step < 1) a.fail("argument 'step' must be an integer >= 1 (1-based), got " + std::to_string(step));
  return [=](Exec& ex) {
    std::vector<float*> pp, mp, vp;
    std::vector<const float*> gp;
    std::vector<int64_t> ns;
    for (size_t i = 0; i < count; i++) {
      pp.push_back(params[i].as<float>());
      gp.push_back(grads[i].as<float>());
      mp.push_back(m[i].as<float>());
      vp.push_back(v[i].as<float>());
      ns.push_back(params[i].numel());
    }
    MLORA_DISPATCH(ex, adamw, pp.data(), gp.data(), mp.data(), vp.data(), ns.data(), int64_t(count), lr, beta1, beta2,
                   eps, wd, step, float(gscale));
  };
}

}  // namespace mlora
