// Reads tests/data/golden.txt, the reference values PyTorch wrote
// (tests/golden/make_golden.py). Each record: "<name> <rows> <cols>" then the values.
#pragma once

#include <lora/types.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>

#ifndef LORA_TEST_DATA_DIR
#error "LORA_TEST_DATA_DIR must name the tests/data folder"
#endif

namespace lora_test {

using Golden = std::map<std::string, lora::Matrix<double>>;

inline const Golden& golden() {
  static const Golden data = [] {
    const std::string path = std::string(LORA_TEST_DATA_DIR) + "/golden.txt";
    std::ifstream in(path);
    if (!in) throw std::runtime_error("cannot open " + path);
    Golden g;
    std::string name;
    while (in >> name) {
      if (name[0] == '#') {
        std::getline(in, name);
        continue;
      }
      lora::Index rows = 0, cols = 0;
      in >> rows >> cols;
      lora::Matrix<double> m(rows, cols);
      for (lora::Index i = 0; i < m.size(); ++i) in >> m.data()[i];
      if (!in) throw std::runtime_error("malformed record " + name + " in " + path);
      g.emplace(name, std::move(m));
    }
    return g;
  }();
  return data;
}

/// The named tensor, converted to Scalar; throws if the file lacks it.
template <class Scalar = double>
lora::Matrix<Scalar> tensor(const std::string& name) {
  const auto& g = golden();
  auto it = g.find(name);
  if (it == g.end()) throw std::runtime_error("golden.txt has no tensor " + name);
  return it->second.cast<Scalar>();
}

/// Largest |a - b| / max(1, |b|) over all entries: relative for large values, absolute near zero.
template <class DA, class DB>
double max_rel_diff(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return 1e300;
  const auto ad = a.template cast<double>().eval();
  const auto bd = b.template cast<double>().eval();
  return ((ad - bd).array().abs() / bd.array().abs().max(1.0)).maxCoeff();
}

/// Agreement with PyTorch expected of a test in Scalar: float carries ~7 significant digits,
/// double matches PyTorch's float64 to rounding.
template <class Scalar>
constexpr double tolerance = sizeof(Scalar) == 4 ? 1e-5 : 1e-10;

/// The same |a - b| / max(1, |b|) as max_rel_diff, for scalars.
inline double rel_diff(double a, double b) { return std::abs(a - b) / std::max(1.0, std::abs(b)); }

}  // namespace lora_test
