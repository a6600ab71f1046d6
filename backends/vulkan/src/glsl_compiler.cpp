#include <glslang/Public/ResourceLimits.h>
#include <glslang/Public/ShaderLang.h>
#include <glslang/SPIRV/GlslangToSpv.h>

#include <mutex>
#include <string>

#include "attnfuse/vulkan.hpp"

namespace attnfuse::vulkan {
namespace {

// glslang's process state is set up once and torn down at exit.
struct glslang_process {
    glslang_process() { glslang::InitializeProcess(); }
    ~glslang_process() { glslang::FinalizeProcess(); }
};

std::mutex& compiler_mutex() {
    static std::mutex m;
    return m;
}

}  // namespace

std::vector<std::uint32_t> compile_compute_shader(std::string_view glsl_source, std::string_view name) {
    static glslang_process process;
    // glslang's front end keeps global tables: one compile at a time.
    std::lock_guard lock(compiler_mutex());

    glslang::TShader shader(EShLangCompute);
    const std::string source(glsl_source), shader_name(name);
    const char* text = source.c_str();
    const char* names = shader_name.c_str();
    shader.setStringsWithLengthsAndNames(&text, nullptr, &names, 1);
    shader.setEnvInput(glslang::EShSourceGlsl, EShLangCompute, glslang::EShClientVulkan, 100);
    shader.setEnvClient(glslang::EShClientVulkan, glslang::EShTargetVulkan_1_1);
    shader.setEnvTarget(glslang::EShTargetSpv, glslang::EShTargetSpv_1_3);
    const auto messages = static_cast<EShMessages>(EShMsgSpvRules | EShMsgVulkanRules);
    if (!shader.parse(GetDefaultResources(), 450, false, messages))
        throw shader_compile_error("attnfuse internal: glslang rejected shader " + shader_name + ":\n" +
                                   shader.getInfoLog() + "\n--- source ---\n" + source);
    glslang::TProgram program;
    program.addShader(&shader);
    if (!program.link(messages))
        throw shader_compile_error("attnfuse internal: glslang could not link shader " + shader_name + ":\n" +
                                   program.getInfoLog());
    std::vector<std::uint32_t> spirv;
    glslang::SpvOptions options;
    options.validate = false;
    glslang::GlslangToSpv(*program.getIntermediate(EShLangCompute), spirv, &options);
    return spirv;
}

}  // namespace attnfuse::vulkan
