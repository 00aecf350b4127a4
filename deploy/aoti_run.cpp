// Runs an AOTInductor package on the CPU, with no Python in the process.
//
//   aoti_run PACKAGE.pt2 INPUTS.pt OUTPUTS.pt
//
// INPUTS.pt holds the model's positional inputs as a list of tensors, written by
// Python's torch.save; the outputs are written as a tuple of tensors that torch.load
// reads. The package's fused LSTM layers call the ops of birnn_ext, which this
// program links (their registrations run when the library loads).
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " PACKAGE.pt2 INPUTS.pt OUTPUTS.pt\n";
    return 2;
  }
  try {
    const c10::IValue loaded = torch::jit::pickle_load(read_file(argv[2]));
    std::vector<at::Tensor> inputs;
    for (const c10::IValue& v : loaded.toListRef()) inputs.push_back(v.toTensor());
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    std::vector<at::Tensor> outputs = loader.run(inputs);

    // A tuple: torch.load(weights_only=True) reads it, where a typed tensor list would
    // need a global of TorchScript's allowed first.
    std::vector<c10::IValue> items(outputs.begin(), outputs.end());
    write_file(argv[3], torch::jit::pickle_save(c10::ivalue::Tuple::create(std::move(items))));
    std::cout << "ran " << argv[1] << ": " << inputs.size() << " inputs, " << outputs.size() << " outputs\n";
  } catch (const std::exception& e) {
    std::cerr << "aoti_run: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
