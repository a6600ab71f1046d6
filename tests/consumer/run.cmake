# ctest's consumer test: install attnfuse into a temporary prefix, then
# configure, build and run tests/consumer against it with find_package.
# Variables: BUILD_DIR (attnfuse's build), SOURCE_DIR (tests/consumer), WORK_DIR.
# With CPU_ONLY_FROM (attnfuse's source tree) it first configures, builds and
# installs a CPU-only attnfuse there (ATTNFUSE_VULKAN=OFF) with Vulkan and
# glslang hidden from find_package, so that neither can be needed.
file(REMOVE_RECURSE ${WORK_DIR})
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "failed (${status}): ${ARGN}")
  endif()
endfunction()
set(hide_vulkan "")
if(DEFINED BUILT_WITH_VULKAN)
  set(expect ${BUILT_WITH_VULKAN})
else()
  set(expect ON)
endif()
if(DEFINED CPU_ONLY_FROM)
  set(hide_vulkan -DCMAKE_DISABLE_FIND_PACKAGE_Vulkan=ON -DCMAKE_DISABLE_FIND_PACKAGE_glslang=ON)
  set(expect OFF)
  set(BUILD_DIR ${WORK_DIR}/attnfuse-build)
  run(${CMAKE_COMMAND} -S ${CPU_ONLY_FROM} -B ${BUILD_DIR} -DCMAKE_BUILD_TYPE=Release -DATTNFUSE_VULKAN=OFF
      -DATTNFUSE_BUILD_TESTS=OFF -DATTNFUSE_BUILD_EXAMPLES=OFF -DATTNFUSE_BUILD_BENCH=OFF ${hide_vulkan})
  run(${CMAKE_COMMAND} --build ${BUILD_DIR})
endif()
run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/build -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
    -DEXPECT_VULKAN=${expect} ${hide_vulkan})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/consumer)
