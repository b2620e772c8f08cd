// Definitions of MultiLoRALinear; see <lora/multi.hpp> for the math and the API.
#pragma once

#ifndef LORA_INSIDE_LIBRARY
#error "lora/detail/multi_impl.hpp is internal; include <lora/lora.hpp>"
#endif

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <utility>

namespace lora {

namespace detail {
inline std::string quoted(const std::string& s) { return '"' + s + '"'; }
}  // namespace detail

template <class Scalar>
MultiLoRALinear<Scalar>::MultiLoRALinear(Mat weight) : MultiLoRALinear(std::move(weight), Row()) {}

template <class Scalar>
MultiLoRALinear<Scalar>::MultiLoRALinear(Mat weight, Row bias) {
  detail::check_features("MultiLoRALinear", weight.rows(), weight.cols());
  if (bias.size() != 0 && bias.size() != weight.rows())
    throw shape_error("MultiLoRALinear(weight, bias): bias expected " + std::to_string(weight.rows()) +
                      " entries (out_features of weight " + shape_string(weight.rows(), weight.cols()) + "), got " +
                      std::to_string(bias.size()));
  in_ = weight.cols();
  out_ = weight.rows();
  weight_ = FrozenWeight<Scalar>::owned(std::move(weight));
  has_bias_ = bias.size() != 0;
  bias_ = std::move(bias);
  state_ = std::make_shared<const State>();
}

template <class Scalar>
MultiLoRALinear<Scalar>::MultiLoRALinear(FrozenWeight<Scalar> weight, Row bias) {
  if (weight.out_features() <= 0) throw shape_error("MultiLoRALinear(FrozenWeight): the weight is empty");
  if (bias.size() != 0 && bias.size() != weight.out_features())
    throw shape_error("MultiLoRALinear(FrozenWeight, bias): bias expected " + std::to_string(weight.out_features()) +
                      " entries (out_features), got " + std::to_string(bias.size()));
  in_ = weight.in_features();
  out_ = weight.out_features();
  weight_ = std::move(weight);
  has_bias_ = bias.size() != 0;
  bias_ = std::move(bias);
  state_ = std::make_shared<const State>();
}

template <class Scalar>
MultiLoRALinear<Scalar> MultiLoRALinear<Scalar>::view(const Scalar* weight, Index out_features, Index in_features,
                                                      const Scalar* bias) {
  detail::check_features("MultiLoRALinear::view", out_features, in_features);
  if (weight == nullptr) throw shape_error("MultiLoRALinear::view: weight must not be null");
  auto w = FrozenWeight<Scalar>::view(weight, out_features, in_features);
  if (bias == nullptr) return MultiLoRALinear(std::move(w));
  return MultiLoRALinear(std::move(w), ConstMatrixMap<Scalar>(bias, 1, out_features));
}

// ---- adapters ---------------------------------------------------------------------------

template <class Scalar>
const typename MultiLoRALinear<Scalar>::AdapterPtr* MultiLoRALinear<Scalar>::find(const State& s,
                                                                                  const std::string& name) {
  for (const auto& a : s.adapters)
    if (a->name == name) return &a;
  return nullptr;
}

template <class Scalar>
std::string MultiLoRALinear<Scalar>::known_names(const State& s) const {
  if (s.adapters.empty()) return "it has no adapters";
  std::string out = "it has ";
  for (std::size_t i = 0; i < s.adapters.size(); ++i)
    out += (i ? ", " : "") + detail::quoted(s.adapters[i]->name) + " (id " + std::to_string(s.adapters[i]->id) + ")";
  return out;
}

template <class Scalar>
const typename MultiLoRALinear<Scalar>::AdapterPtr& MultiLoRALinear<Scalar>::require(const State& s,
                                                                                     const std::string& name,
                                                                                     const char* where) const {
  if (const AdapterPtr* a = find(s, name)) return *a;
  throw config_error(std::string(where) + ": no adapter named " + detail::quoted(name) + " in this layer; " +
                     known_names(s));
}

template <class Scalar>
void MultiLoRALinear<Scalar>::check_new_name(const char* where, const State& s, const std::string& name) const {
  if (name.empty()) throw config_error(std::string(where) + ": the adapter name must not be empty");
  if (name == base_name)
    throw config_error(std::string(where) + ": " + detail::quoted(name) +
                       " is reserved: it marks rows that run the base layer alone");
  if (find(s, name) != nullptr)
    throw config_error(std::string(where) + ": an adapter named " + detail::quoted(name) +
                       " already exists in this layer; remove_adapter or replace_adapter it first");
}

template <class Scalar>
typename MultiLoRALinear<Scalar>::AdapterPtr MultiLoRALinear<Scalar>::make_adapter(
    const char* where, const std::string& name, int id, const LoraConfig& config, const ConstRef<Scalar>& A,
    const ConstRef<Scalar>& B, double scale, const Matrix<Scalar>& magnitude) const {
  const std::string who = std::string(where) + ": adapter " + detail::quoted(name);
  try {
    config.validate();
  } catch (const config_error& e) {
    throw config_error(who + ": " + e.what());
  }
  if (config.r <= 0) throw config_error(who + ": r must be >= 1, got " + std::to_string(config.r));
  if (magnitude.size() != 0 && (!config.use_dora || magnitude.size() != out_))
    throw shape_error(who + (config.use_dora ? ": DoRA's magnitude expected " + std::to_string(out_) +
                                                   " entries (out_features), got " + std::to_string(magnitude.size())
                                             : ": a DoRA magnitude was given, but config.use_dora is false"));
  if (config.bias != BiasMode::none)
    throw config_error(who +
                       ": bias must be none; the base bias is shared by every adapter of the layer and stays frozen");
  const std::string expected_A = shape_string(config.r, in_), expected_B = shape_string(out_, config.r);
  if (A.rows() != config.r || A.cols() != in_ || B.rows() != out_ || B.cols() != config.r)
    throw shape_error(who + ": lora_A expected " + expected_A + ", got " + shape_string(A.rows(), A.cols()) +
                      "; lora_B expected " + expected_B + ", got " + shape_string(B.rows(), B.cols()) +
                      " (the layer is " + shape_string(out_, in_) + ", r = " + std::to_string(config.r) + ")");
  auto a = std::make_shared<NamedAdapter<Scalar>>();
  a->name = name;
  a->id = id;
  a->config = config;
  a->scale = scale;
  a->lora_A = A;
  a->lora_B = B;
  if (config.use_dora) {
    a->magnitude = magnitude;
    set_dora_scale(who.c_str(), *a);
  }
  return a;
}

template <class Scalar>
void MultiLoRALinear<Scalar>::set_dora_scale(const char* where, NamedAdapter<Scalar>& a) const {
  if (w_sq_norms_.size() == 0) w_sq_norms_ = weight_.output_squared_norms();
  const RowVector<Scalar> n =
      weight_.low_rank_row_norms(where, "output row", w_sq_norms_, a.scaling(), a.lora_B, a.lora_A);
  if (a.magnitude.size() == 0) a.magnitude = n;  // PEFT's init: m = n, so the adapter is plain LoRA at first
  a.magnitude.resize(1, out_);
  a.dora_scale = a.magnitude.cwiseQuotient(n);
}

template <class Scalar>
void MultiLoRALinear<Scalar>::check_not_training(const char* where, const std::string& name) const {
  std::lock_guard<std::mutex> lock(*trainer_lock_);
  if (trainer_ && trained_name_ == name)
    throw state_error(std::string(where) + ": adapter " + detail::quoted(name) +
                      " is being trained; finish_training() first");
}

template <class Scalar>
void MultiLoRALinear<Scalar>::publish_replacing(const State& now, AdapterPtr a) {
  auto next = std::make_shared<State>(now);
  for (auto& p : next->adapters)
    if (p->name == a->name) p = a;
  publish(std::move(next));
}

template <class Scalar>
void MultiLoRALinear<Scalar>::add_adapter(const std::string& name, const LoraConfig& given) {
  const LoraConfig config = given.with_seed();  // unset: the next seed of lora::next_seed()'s sequence
  // A (R, I) and B (O, R) drawn as LoRALinear draws them from the same config; r < 1 is refused by the overload.
  const Index r = std::max(config.r, 0);
  Mat A(r, in_), B(out_, r);
  detail::init_lora_weights<Scalar>(MatrixMap<Scalar>(A.data(), r, in_), MatrixMap<Scalar>(B.data(), out_, r), config);
  add_adapter(name, config, A, B);
}

template <class Scalar>
void MultiLoRALinear<Scalar>::add_adapter(const std::string& name, const LoraConfig& config,
                                          const ConstRef<Scalar>& lora_A, const ConstRef<Scalar>& lora_B,
                                          const Matrix<Scalar>& magnitude) {
  const char* where = "MultiLoRALinear::add_adapter";
  std::lock_guard<std::mutex> lock(*writers_);
  StatePtr now = snapshot();
  check_new_name(where, *now, name);
  AdapterPtr a = make_adapter(where, name, next_id_, config, lora_A, lora_B, 1.0, magnitude);
  auto next = std::make_shared<State>(*now);
  next->adapters.push_back(std::move(a));
  ++next_id_;
  publish(std::move(next));
}

template <class Scalar>
void MultiLoRALinear<Scalar>::replace_adapter(const std::string& name, const LoraConfig& config,
                                              const ConstRef<Scalar>& lora_A, const ConstRef<Scalar>& lora_B,
                                              const Matrix<Scalar>& magnitude) {
  const char* where = "MultiLoRALinear::replace_adapter";
  std::lock_guard<std::mutex> lock(*writers_);
  StatePtr now = snapshot();
  const AdapterPtr& old = require(*now, name, where);
  check_not_training(where, name);
  AdapterPtr a = make_adapter(where, name, old->id, config, lora_A, lora_B, old->scale, magnitude);
  publish_replacing(*now, std::move(a));
}

template <class Scalar>
void MultiLoRALinear<Scalar>::remove_adapter(const std::string& name) {
  const char* where = "MultiLoRALinear::remove_adapter";
  std::lock_guard<std::mutex> lock(*writers_);
  StatePtr now = snapshot();
  require(*now, name, where);
  auto next = std::make_shared<State>(*now);
  next->adapters.erase(std::remove_if(next->adapters.begin(), next->adapters.end(),
                                      [&](const AdapterPtr& p) { return p->name == name; }),
                       next->adapters.end());
  next->active.erase(std::remove(next->active.begin(), next->active.end(), name), next->active.end());
  std::lock_guard<std::mutex> training_lock(*trainer_lock_);
  if (trained_name_ == name) {
    trainer_.reset();
    trained_name_.clear();
    *training_ = false;
  }
  publish(std::move(next));
}

template <class Scalar>
bool MultiLoRALinear<Scalar>::has_adapter(const std::string& name) const {
  return find(*snapshot(), name) != nullptr;
}

template <class Scalar>
std::vector<std::string> MultiLoRALinear<Scalar>::adapter_names() const {
  StatePtr s = snapshot();
  std::vector<std::string> names;
  for (const auto& a : s->adapters) names.push_back(a->name);
  return names;
}

template <class Scalar>
std::size_t MultiLoRALinear<Scalar>::adapter_count() const {
  return snapshot()->adapters.size();
}

template <class Scalar>
typename MultiLoRALinear<Scalar>::AdapterPtr MultiLoRALinear<Scalar>::adapter(const std::string& name) const {
  StatePtr s = snapshot();
  return require(*s, name, "MultiLoRALinear::adapter");
}

template <class Scalar>
int MultiLoRALinear<Scalar>::adapter_id(const std::string& name) const {
  StatePtr s = snapshot();
  return require(*s, name, "MultiLoRALinear::adapter_id")->id;
}

template <class Scalar>
void MultiLoRALinear<Scalar>::set_active_adapters(const std::vector<std::string>& names) {
  const char* where = "MultiLoRALinear::set_active_adapters";
  std::lock_guard<std::mutex> lock(*writers_);
  StatePtr now = snapshot();
  for (std::size_t i = 0; i < names.size(); ++i) {
    require(*now, names[i], where);
    for (std::size_t j = 0; j < i; ++j)
      if (names[j] == names[i])
        throw config_error(std::string(where) + ": adapter " + detail::quoted(names[i]) +
                           " is listed twice; each active adapter is added once");
  }
  auto next = std::make_shared<State>(*now);
  next->active = names;
  publish(std::move(next));
}

template <class Scalar>
std::vector<std::string> MultiLoRALinear<Scalar>::active_adapters() const {
  return snapshot()->active;
}

template <class Scalar>
void MultiLoRALinear<Scalar>::set_scale(const std::string& name, double scale) {
  const char* where = "MultiLoRALinear::set_scale";
  std::lock_guard<std::mutex> lock(*writers_);
  StatePtr now = snapshot();
  const AdapterPtr& old = require(*now, name, where);
  if (!std::isfinite(scale))
    throw config_error(std::string(where) + ": adapter " + detail::quoted(name) + ": scale must be finite, got " +
                       value_string(scale));
  check_not_training(where, name);
  auto a = std::make_shared<NamedAdapter<Scalar>>(*old);  // copies r (I + O) scalars: set_scale is not a hot path
  a->scale = scale;
  if (a->config.use_dora) set_dora_scale(where, *a);  // n depends on s
  publish_replacing(*now, std::move(a));
}

template <class Scalar>
double MultiLoRALinear<Scalar>::scale(const std::string& name) const {
  StatePtr s = snapshot();
  return require(*s, name, "MultiLoRALinear::scale")->scale;
}

template <class Scalar>
void MultiLoRALinear<Scalar>::set_enabled(bool enabled) {
  std::lock_guard<std::mutex> lock(*writers_);
  auto next = std::make_shared<State>(*snapshot());
  next->enabled = enabled;
  publish(std::move(next));
}

template <class Scalar>
bool MultiLoRALinear<Scalar>::adapters_enabled() const {
  return snapshot()->enabled;
}

template <class Scalar>
Index MultiLoRALinear<Scalar>::adapter_parameter_count() const {
  StatePtr s = snapshot();
  Index n = 0;
  for (const auto& a : s->adapters) n += a->lora_A.size() + a->lora_B.size() + a->magnitude.size();
  return n;
}

// ---- weighted combinations -------------------------------------------------------------------

template <class Scalar>
void MultiLoRALinear<Scalar>::add_weighted_adapter(const std::vector<std::string>& adapters,
                                                   const std::vector<double>& weights, const std::string& new_name,
                                                   Combination combination, int svd_rank) {
  const std::string where = std::string("MultiLoRALinear::add_weighted_adapter(") + combination_name(combination) + ")";
  StatePtr now = snapshot();
  check_new_name(where.c_str(), *now, new_name);
  const std::string target = "new adapter " + detail::quoted(new_name);
  if (adapters.empty()) throw config_error(where + ": " + target + ": no source adapters given");
  if (weights.size() != adapters.size())
    throw config_error(where + ": " + target + ": " + std::to_string(adapters.size()) + " adapters but " +
                       std::to_string(weights.size()) + " weights; give one weight per adapter");
  std::vector<AdapterPtr> src;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    src.push_back(require(*now, adapters[i], where.c_str()));
    if (src.back()->config.use_dora)
      throw config_error(where + ": " + target + ": adapter " + detail::quoted(adapters[i]) +
                         " is DoRA: its magnitude rescales the rows of W + s·B A, so it is no update B A that can be "
                         "weighted and added to others");
    if (!std::isfinite(weights[i]))
      throw config_error(where + ": " + target + ": the weight of adapter " + detail::quoted(adapters[i]) +
                         " must be finite, got " + value_string(weights[i]));
  }
  // wᵢ sᵢ: each source's weight times its scaling (its runtime scale included).
  std::vector<double> ws(src.size());
  int max_rank = 0, total_rank = 0;
  for (std::size_t i = 0; i < src.size(); ++i) {
    ws[i] = weights[i] * static_cast<double>(src[i]->scaling());
    max_rank = std::max(max_rank, src[i]->config.r);
    total_rank += src[i]->config.r;
  }

  Mat A, B;
  if (combination == Combination::linear) {
    for (const auto& a : src)
      if (a->config.r != src[0]->config.r)
        throw config_error(where + ": " + target + ": linear needs equal ranks, but adapter " +
                           detail::quoted(src[0]->name) + " has r = " + std::to_string(src[0]->config.r) +
                           " and adapter " + detail::quoted(a->name) + " has r = " + std::to_string(a->config.r) +
                           "; use cat or svd");
    A = Mat::Zero(src[0]->config.r, in_);
    B = Mat::Zero(out_, src[0]->config.r);
    for (std::size_t i = 0; i < src.size(); ++i) {
      const double root = std::sqrt(std::abs(ws[i]));
      A += static_cast<Scalar>(ws[i] < 0 ? -root : root) * src[i]->lora_A;
      B += static_cast<Scalar>(root) * src[i]->lora_B;
    }
  } else {
    // B A = Σ wᵢsᵢ Bᵢ Aᵢ exactly with A = [w₁s₁A₁; ...] (k, I), B = [B₁ ...] (O, k), k = Σ rᵢ.
    Mat Acat(total_rank, in_), Bcat(out_, total_rank);
    Index off = 0;
    for (std::size_t i = 0; i < src.size(); ++i) {
      const Index r = src[i]->config.r;
      Acat.middleRows(off, r) = static_cast<Scalar>(ws[i]) * src[i]->lora_A;
      Bcat.middleCols(off, r) = src[i]->lora_B;
      off += r;
    }
    if (combination == Combination::cat) {
      A = std::move(Acat);
      B = std::move(Bcat);
    } else {
      const int rank = svd_rank == 0 ? max_rank : svd_rank;
      if (svd_rank < 0 || rank > std::min(in_, out_))
        throw config_error(where + ": " + target + ": svd_rank must be in [1, " + std::to_string(std::min(in_, out_)) +
                           "] (min of the layer's " + shape_string(out_, in_) +
                           "), or 0 for the largest source rank; got " + std::to_string(svd_rank));
      // SVD of the low-rank product without forming the (O, I) matrix:
      // Bcat = Q_B R_B, Acatᵀ = Q_A R_A, so Bcat Acat = Q_B (R_B R_Aᵀ) Q_Aᵀ = (Q_B U) Σ (Q_A V)ᵀ
      // with U Σ Vᵀ the SVD of the small core R_B R_Aᵀ (Eigen's JacobiSVD, in double).
      using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;
      const MatD Bd = Bcat.template cast<double>(), Atd = Acat.transpose().template cast<double>();
      Eigen::HouseholderQR<MatD> qb(Bd), qa(Atd);
      const Index kb = std::min<Index>(out_, total_rank), ka = std::min<Index>(in_, total_rank);
      const MatD QB = qb.householderQ() * MatD::Identity(out_, kb);
      const MatD QA = qa.householderQ() * MatD::Identity(in_, ka);
      const MatD RB = qb.matrixQR().topRows(kb).template triangularView<Eigen::Upper>();
      const MatD RA = qa.matrixQR().topRows(ka).template triangularView<Eigen::Upper>();
      const MatD core = RB * RA.transpose();  // (kb, ka)
      Eigen::JacobiSVD<MatD> svd(core, Eigen::ComputeThinU | Eigen::ComputeThinV);
      const auto& S = svd.singularValues();
      // An upper bound on ‖Σ wᵢsᵢBᵢAᵢ‖: a largest singular value below rounding of it means the weights cancel.
      double bound = 0;
      for (std::size_t i = 0; i < src.size(); ++i)
        bound += std::abs(ws[i]) * src[i]->lora_B.template cast<double>().norm() *
                 src[i]->lora_A.template cast<double>().norm();
      const double tiny = 64.0 * total_rank * std::numeric_limits<Scalar>::epsilon() * bound;
      if (S.size() == 0 || !(S(0) > tiny)) {
        std::string list;
        for (std::size_t i = 0; i < src.size(); ++i)
          list += (i ? ", " : "") + detail::quoted(adapters[i]) + " x " + value_string(weights[i]);
        throw config_error(where + ": " + target + ": the weighted sum Σ wᵢ·sᵢ·Bᵢ·Aᵢ of " + list +
                           " is zero (the weights cancel or are all zero), so it has no singular vectors to keep");
      }
      const Index keep = std::min<Index>(rank, S.size());
      A = Mat::Zero(rank, in_);
      B = Mat::Zero(out_, rank);
      B.leftCols(keep) = ((QB * svd.matrixU().leftCols(keep)) * S.head(keep).asDiagonal()).template cast<Scalar>();
      A.topRows(keep) = (QA * svd.matrixV().leftCols(keep)).transpose().template cast<Scalar>();
    }
  }
  LoraConfig config = src[0]->config;
  config.r = static_cast<int>(A.rows());
  config.lora_alpha = static_cast<double>(A.rows());
  config.use_rslora = false;
  add_adapter(new_name, config, A, B);
}

// ---- forward ---------------------------------------------------------------------------------

template <class Scalar>
void MultiLoRALinear<Scalar>::base_forward(const char* where, const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
  detail::check_shape(where, "x", x, -1, in_);
  detail::check_shape(where, "y", y, x.rows(), out_);
  detail::check_no_overlap(where, "y", y, "x", x);
  weight_.forward(x, y);
  if (has_bias_) y.rowwise() += bias_;
}

// x (N, I) -> y (N, O): y = x Wᵀ + b + Σ_{a active} s_a (x A_aᵀ) B_aᵀ
template <class Scalar>
void MultiLoRALinear<Scalar>::forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) const {
  const char* where = "MultiLoRALinear::forward";
  StatePtr s = snapshot();  // one consistent adapter set for the whole call
  bool dora = false;
  if (s->enabled)
    for (const auto& name : s->active) dora = dora || (*find(*s, name))->config.use_dora;
  if (!dora) {
    base_forward(where, x, y);
    if (!s->enabled) return;
    Mat H;
    for (const auto& name : s->active) {
      const AdapterPtr* a = find(*s, name);
      H.noalias() = x * (*a)->lora_A.transpose();  // (N, R)
      y.noalias() += (*a)->scaling() * H * (*a)->lora_B.transpose();
    }
    return;
  }
  // DoRA among the active adapters: each adds (c − 1) ⊙ x Wᵀ + c ⊙ s·H Bᵀ (PEFT's DoraLinearLayer.forward), so
  // x Wᵀ is kept apart from the sum until every term is in; the bias comes last.
  detail::check_shape(where, "x", x, -1, in_);
  detail::check_shape(where, "y", y, x.rows(), out_);
  detail::check_no_overlap(where, "y", y, "x", x);
  Mat base(x.rows(), out_), H, T;
  weight_.forward(x, base);
  y = base;
  for (const auto& name : s->active) {
    const NamedAdapter<Scalar>& a = **find(*s, name);
    H.noalias() = x * a.lora_A.transpose();  // (N, R)
    if (!a.config.use_dora) {
      y.noalias() += a.scaling() * H * a.lora_B.transpose();
      continue;
    }
    T.noalias() = a.scaling() * H * a.lora_B.transpose();  // (N, O)
    const auto c = a.dora_scale.row(0).array();
    y.array() += base.array().rowwise() * (c - Scalar(1)) + T.array().rowwise() * c;
  }
  if (has_bias_) y.rowwise() += bias_;
}

template <class Scalar>
typename MultiLoRALinear<Scalar>::Mat MultiLoRALinear<Scalar>::forward(const ConstRef<Scalar>& x) const {
  detail::check_shape("MultiLoRALinear::forward", "x", x, -1, in_);
  Mat y(x.rows(), out_);
  forward(x, y);
  return y;
}

// x (N, I), rows grouped by adapter: for group g with rows P_g, y[P_g] += s_g (x[P_g] A_gᵀ) B_gᵀ
template <class Scalar>
void MultiLoRALinear<Scalar>::forward_grouped(const ConstRef<Scalar>& x, const State& state,
                                              const std::vector<int>& row_adapter, MutRef<Scalar> y) const {
  const Index N = x.rows();
  const int G = static_cast<int>(state.adapters.size());
  // Counting sort of the rows by adapter (stable): start[g] .. start[g+1] in `order`.
  std::vector<Index> start(G + 1, 0), order(N);
  for (Index n = 0; n < N; ++n)
    if (row_adapter[n] >= 0) ++start[row_adapter[n] + 1];
  for (int g = 0; g < G; ++g) start[g + 1] += start[g];
  {
    std::vector<Index> fill(start.begin(), start.end() - 1);
    for (Index n = 0; n < N; ++n)
      if (row_adapter[n] >= 0) order[fill[row_adapter[n]]++] = n;
  }
  Mat xg, H, dy;
  for (int g = 0; g < G; ++g) {
    const Index first = start[g], count = start[g + 1] - first;
    if (count == 0) continue;
    const NamedAdapter<Scalar>& a = *state.adapters[g];
    // Rows that already sit together (a batch sorted by adapter) are used in place.
    const bool contiguous = order[first + count - 1] - order[first] == count - 1;
    if (a.config.use_dora) {
      // y_n holds x_n Wᵀ + b: the adapter alone makes it b + c ⊙ (x_n Wᵀ + s·H_n Bᵀ)
      xg.resize(count, in_);
      for (Index k = 0; k < count; ++k) xg.row(k) = x.row(order[first + k]);
      H.noalias() = xg * a.lora_A.transpose();
      dy.noalias() = a.scaling() * H * a.lora_B.transpose();  // (count, O)
      const auto c = a.dora_scale.row(0).array();
      for (Index k = 0; k < count; ++k) {
        auto row = y.row(order[first + k]).array();
        if (has_bias_)
          row = (row - bias_.array() + dy.row(k).array()) * c + bias_.array();
        else
          row = (row + dy.row(k).array()) * c;
      }
      continue;
    }
    if (contiguous) {
      const Index r0 = order[first];
      H.noalias() = x.middleRows(r0, count) * a.lora_A.transpose();  // (count, R)
      y.middleRows(r0, count).noalias() += a.scaling() * H * a.lora_B.transpose();
      continue;
    }
    xg.resize(count, in_);
    for (Index k = 0; k < count; ++k) xg.row(k) = x.row(order[first + k]);
    H.noalias() = xg * a.lora_A.transpose();
    dy.noalias() = a.scaling() * H * a.lora_B.transpose();  // (count, O)
    for (Index k = 0; k < count; ++k) y.row(order[first + k]) += dy.row(k);
  }
}

template <class Scalar>
void MultiLoRALinear<Scalar>::forward(const ConstRef<Scalar>& x, const std::vector<std::string>& row_adapters,
                                      MutRef<Scalar> y) const {
  const char* where = "MultiLoRALinear::forward(mixed batch)";
  StatePtr s = snapshot();
  if (static_cast<Index>(row_adapters.size()) != x.rows())
    throw shape_error(std::string(where) + ": expected one adapter name per row of x (" + std::to_string(x.rows()) +
                      "), got " + std::to_string(row_adapters.size()));
  std::vector<int> index(row_adapters.size());
  std::map<std::string, int> seen;
  for (std::size_t n = 0; n < row_adapters.size(); ++n) {
    const std::string& name = row_adapters[n];
    auto it = seen.find(name);
    if (it == seen.end()) {
      int g = -1;
      if (name != base_name) {
        for (std::size_t i = 0; i < s->adapters.size() && g < 0; ++i)
          if (s->adapters[i]->name == name) g = static_cast<int>(i);
        if (g < 0)
          throw config_error(std::string(where) + ": row " + std::to_string(n) + " asks for adapter " +
                             detail::quoted(name) + ", which this layer does not have; " + known_names(*s) + ", or " +
                             detail::quoted(base_name) + " for the base layer alone");
      }
      it = seen.emplace(name, g).first;
    }
    index[n] = it->second;
  }
  base_forward(where, x, y);
  forward_grouped(x, *s, index, y);
}

template <class Scalar>
void MultiLoRALinear<Scalar>::forward(const ConstRef<Scalar>& x, const std::vector<int>& row_ids,
                                      MutRef<Scalar> y) const {
  const char* where = "MultiLoRALinear::forward(mixed batch)";
  StatePtr s = snapshot();
  if (static_cast<Index>(row_ids.size()) != x.rows())
    throw shape_error(std::string(where) + ": expected one adapter id per row of x (" + std::to_string(x.rows()) +
                      "), got " + std::to_string(row_ids.size()));
  std::map<int, int> slot;  // id -> position in the snapshot
  for (std::size_t i = 0; i < s->adapters.size(); ++i) slot[s->adapters[i]->id] = static_cast<int>(i);
  std::vector<int> index(row_ids.size());
  for (std::size_t n = 0; n < row_ids.size(); ++n) {
    if (row_ids[n] == base_id) {
      index[n] = -1;
      continue;
    }
    auto it = slot.find(row_ids[n]);
    if (it == slot.end())
      throw config_error(std::string(where) + ": row " + std::to_string(n) + " has adapter id " +
                         std::to_string(row_ids[n]) + ", which no adapter of this layer has; " + known_names(*s) +
                         ", or " + std::to_string(base_id) + " for the base layer alone");
    index[n] = it->second;
  }
  base_forward(where, x, y);
  forward_grouped(x, *s, index, y);
}

template <class Scalar>
void MultiLoRALinear<Scalar>::forward(const ConstRef<Scalar>& x, MutRef<Scalar> y) {
  if (!training_->load()) {  // serving: no lock
    std::as_const(*this).forward(x, y);
    return;
  }
  std::unique_lock<std::mutex> lock(*trainer_lock_);
  if (!training_->load() || !trainer_) {  // eval() or finish_training() came in between
    lock.unlock();
    std::as_const(*this).forward(x, y);
    return;
  }
  StatePtr s = snapshot();
  if (!s->enabled || s->active.size() != 1 || s->active[0] != trained_name_)
    throw state_error("MultiLoRALinear::forward: training runs the trained adapter " + detail::quoted(trained_name_) +
                      " alone, but the active set changed (or adapters were disabled); call train_adapter(" +
                      detail::quoted(trained_name_) + ") again, or eval() to serve");
  trainer_->forward(x, y);
}

// ---- training -------------------------------------------------------------------------------

template <class Scalar>
LoRALinear<Scalar>& MultiLoRALinear<Scalar>::trainer(const char* where) {
  if (!trainer_)
    throw state_error(std::string(where) + ": no adapter is being trained; call train_adapter(name) first");
  return *trainer_;
}

template <class Scalar>
const LoRALinear<Scalar>& MultiLoRALinear<Scalar>::trainer(const char* where) const {
  if (!trainer_)
    throw state_error(std::string(where) + ": no adapter is being trained; call train_adapter(name) first");
  return *trainer_;
}

template <class Scalar>
void MultiLoRALinear<Scalar>::publish_trained_locked() {
  if (!trainer_) return;
  StatePtr now = snapshot();
  const AdapterPtr* old = find(*now, trained_name_);
  if (old == nullptr) return;
  auto a = std::make_shared<NamedAdapter<Scalar>>();
  a->name = (*old)->name;
  a->id = (*old)->id;
  a->config = (*old)->config;
  a->scale = (*old)->scale;
  a->lora_A = trainer_->lora_A();
  a->lora_B = trainer_->lora_B();
  if (a->config.use_dora) {
    a->magnitude = trainer_->magnitude();
    set_dora_scale("MultiLoRALinear (publishing the trained adapter)", *a);
  }
  publish_replacing(*now, std::move(a));
}

template <class Scalar>
void MultiLoRALinear<Scalar>::train_adapter(const std::string& name) {
  const char* where = "MultiLoRALinear::train_adapter";
  std::lock_guard<std::mutex> lock(*writers_);
  std::lock_guard<std::mutex> training_lock(*trainer_lock_);
  publish_trained_locked();
  StatePtr now = snapshot();
  const AdapterPtr& a = require(*now, name, where);
  // The trainer computes s = lora_alpha' / r with lora_alpha' = scale · lora_alpha: the serving scaling.
  LoraConfig cfg = a->config;
  cfg.lora_alpha = a->config.lora_alpha * a->scale;
  auto t = std::make_unique<LoRALinear<Scalar>>(has_bias_ ? LoRALinear<Scalar>(weight_.read_only_view(), bias_, cfg)
                                                          : LoRALinear<Scalar>(weight_.read_only_view(), cfg));
  t->lora_A() = a->lora_A;
  t->lora_B() = a->lora_B;
  if (a->config.use_dora) t->magnitude() = a->magnitude;
  t->train();
  auto next = std::make_shared<State>(*now);
  next->active = {name};
  next->enabled = true;
  trainer_ = std::move(t);
  trained_name_ = name;
  *training_ = true;
  publish(std::move(next));
}

template <class Scalar>
void MultiLoRALinear<Scalar>::backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy, MutRef<Scalar> dx) {
  std::lock_guard<std::mutex> lock(*trainer_lock_);
  if (!training_->load()) throw state_error("MultiLoRALinear::backward: the layer is in eval mode; call train() first");
  trainer("MultiLoRALinear::backward").backward(x, dy, dx);
}

template <class Scalar>
void MultiLoRALinear<Scalar>::backward(const ConstRef<Scalar>& x, const ConstRef<Scalar>& dy) {
  std::lock_guard<std::mutex> lock(*trainer_lock_);
  if (!training_->load()) throw state_error("MultiLoRALinear::backward: the layer is in eval mode; call train() first");
  trainer("MultiLoRALinear::backward").backward(x, dy);
}

template <class Scalar>
void MultiLoRALinear<Scalar>::zero_grad() {
  std::lock_guard<std::mutex> lock(*trainer_lock_);
  trainer("MultiLoRALinear::zero_grad").zero_grad();
}

template <class Scalar>
ParameterList<Scalar> MultiLoRALinear<Scalar>::parameters() {
  std::lock_guard<std::mutex> lock(*trainer_lock_);
  ParameterList<Scalar> list = trainer("MultiLoRALinear::parameters").parameters();
  for (auto& p : list) p.name = trained_name_ + "." + p.name;
  return list;
}

template <class Scalar>
ConstMatrixMap<Scalar> MultiLoRALinear<Scalar>::dA() const {
  std::lock_guard<std::mutex> lock(*trainer_lock_);
  return trainer("MultiLoRALinear::dA").dA();
}

template <class Scalar>
ConstMatrixMap<Scalar> MultiLoRALinear<Scalar>::dB() const {
  std::lock_guard<std::mutex> lock(*trainer_lock_);
  return trainer("MultiLoRALinear::dB").dB();
}

template <class Scalar>
void MultiLoRALinear<Scalar>::train(bool mode) {
  std::lock_guard<std::mutex> lock(*writers_);
  std::lock_guard<std::mutex> training_lock(*trainer_lock_);
  if (mode && !trainer_)
    throw state_error("MultiLoRALinear::train: no adapter is chosen for training; call train_adapter(name)");
  if (!mode) publish_trained_locked();
  *training_ = mode;
  if (trainer_) trainer_->train(mode);
}

template <class Scalar>
void MultiLoRALinear<Scalar>::finish_training() {
  std::lock_guard<std::mutex> lock(*writers_);
  std::lock_guard<std::mutex> training_lock(*trainer_lock_);
  publish_trained_locked();
  trainer_.reset();
  trained_name_.clear();
  *training_ = false;
}

}  // namespace lora
