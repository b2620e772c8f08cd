# Configures, builds and runs one consumer project against lora.
#
#   cmake -DCONSUMER=find_package|find_package_headers_only|add_subdirectory -DCONSUMER_SOURCE_DIR=<dir>
#         -DWORK_DIR=<scratch dir> -DLORA_SOURCE_DIR=<repo> -DLORA_BUILD_DIR=<build tree>
#         [-DCONFIG=<config>] [-DGENERATOR=<generator>] [-DCXX_COMPILER=<compiler>]
#         [-DOPT_IN=native,openblas,openmp] [-DTOOLS_BUILT=<tool executables in LORA_BUILD_DIR, ,-separated>]
#         [-DAPPS=<executables to run, ,-separated; default app>] [-DAPP_ARGS=<their arguments, ,-separated>]
#         -P run_consumer.cmake
#
# find_package installs LORA_BUILD_DIR into a fresh prefix under WORK_DIR and points the consumer at that
# prefix only. find_package_headers_only instead configures LORA_SOURCE_DIR afresh (tools on, as for a
# top-level build; tests, examples and benchmarks off), installs that without building anything, and checks
# that the package works without the tools. In both, the consumer is told whether the tools are installed and
# checks that lora::<tool> exists for each tool exactly then. OPT_IN: the opt-in targets the
# consumer links (lora::native, ...). WORK_DIR is wiped on every run.
cmake_minimum_required(VERSION 3.16)

foreach(var IN ITEMS CONSUMER CONSUMER_SOURCE_DIR WORK_DIR LORA_SOURCE_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

# Runs a command; on failure stops with the step's name and everything it printed.
function(run_step step)
  string(REPLACE ";" " " pretty "${ARGN}")
  message(STATUS "[${CONSUMER}] ${step}: ${pretty}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(NOT result STREQUAL "0")
    message(FATAL_ERROR "[${CONSUMER}] ${step} failed (${result}):\n${output}")
  endif()
  message(STATUS "${output}")
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")

set(config_args)
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()

set(configure_args -DCMAKE_BUILD_TYPE=Release -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()

if(OPT_IN)
  list(APPEND configure_args "-DLORA_CONSUMER_OPT_IN=${OPT_IN}")
endif()

# Runs the configure step of a consumer that must fail, and checks its output names why.
function(expect_configure_failure step regex)
  set(dir "${WORK_DIR}/${step}")
  message(STATUS "[${CONSUMER}] ${step}: must fail with /${regex}/")
  execute_process(COMMAND "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${dir}" ${configure_args} ${ARGN}
                  RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
  if(result STREQUAL "0" OR NOT output MATCHES "${regex}")
    message(FATAL_ERROR "[${CONSUMER}] ${step}: expected a failure matching /${regex}/, got (${result}):\n${output}")
  endif()
endfunction()

set(tools lora-inspect lora-merge lora-export-gguf lora-import-gguf)
if(CONSUMER STREQUAL "find_package")
  if(NOT LORA_BUILD_DIR)
    message(FATAL_ERROR "run_consumer.cmake: CONSUMER=find_package needs -DLORA_BUILD_DIR=...")
  endif()
  run_step("install" "${CMAKE_COMMAND}" --install "${LORA_BUILD_DIR}" --prefix "${prefix}" ${config_args})
elseif(CONSUMER STREQUAL "find_package_headers_only")
  # A fresh configure with the tools on, installed with nothing built: the headers and the package only.
  set(lora_build "${WORK_DIR}/lora-build")
  set(lora_args -DCMAKE_BUILD_TYPE=Release -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF
                -DLORA_BUILD_BENCHMARKS=OFF -DLORA_BUILD_TOOLS=ON -DLORA_INSTALL=ON)
  if(GENERATOR)
    list(APPEND lora_args -G "${GENERATOR}")
  endif()
  if(CXX_COMPILER)
    list(APPEND lora_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
  endif()
  run_step("configure lora" "${CMAKE_COMMAND}" -S "${LORA_SOURCE_DIR}" -B "${lora_build}" ${lora_args})
  run_step("install lora, nothing built" "${CMAKE_COMMAND}" --install "${lora_build}" --prefix "${prefix}"
           ${config_args})
  foreach(tool IN LISTS tools)
    if(EXISTS "${lora_build}/tools/${tool}")
      message(FATAL_ERROR "[${CONSUMER}] ${tool} was built, but nothing should have been")
    endif()
  endforeach()
elseif(CONSUMER STREQUAL "add_subdirectory")
  list(APPEND configure_args "-DLORA_SOURCE_DIR=${LORA_SOURCE_DIR}")
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown CONSUMER '${CONSUMER}'")
endif()

if(CONSUMER MATCHES "^find_package")
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}")
  if(NOT EXISTS "${prefix}/include/lora/lora.hpp")
    message(FATAL_ERROR "[${CONSUMER}] the install put no include/lora/lora.hpp under '${prefix}'")
  endif()
  # Tools built in LORA_BUILD_DIR must have been installed; none may be installed otherwise.
  string(REPLACE "," ";" tools_built "${TOOLS_BUILT}")
  set(installed_tools)
  foreach(tool IN LISTS tools)
    if(EXISTS "${prefix}/bin/${tool}")
      list(APPEND installed_tools ${tool})
    endif()
  endforeach()
  foreach(built IN LISTS tools_built)
    get_filename_component(name "${built}" NAME_WE)
    if(EXISTS "${built}" AND NOT name IN_LIST installed_tools)
      message(FATAL_ERROR "[${CONSUMER}] ${built} was built but not installed into ${prefix}/bin")
    endif()
  endforeach()
  if(installed_tools STREQUAL "${tools}")
    list(APPEND configure_args -DLORA_EXPECT_TOOLS=ON)
  elseif(NOT installed_tools)
    list(APPEND configure_args -DLORA_EXPECT_TOOLS=OFF)
    # Asking for the tools must then fail, naming them, rather than give targets without files.
    expect_configure_failure("configure-requiring-tools" "lora.*tools" -DLORA_CONSUMER_COMPONENTS=tools)
  else()
    message(FATAL_ERROR "[${CONSUMER}] only ${installed_tools} installed in ${prefix}/bin")
  endif()
  message(STATUS "[${CONSUMER}] tools installed: ${installed_tools}")
endif()

run_step("configure" "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${build}" ${configure_args})

if(CONSUMER MATCHES "^find_package")
  # The package must come from the fresh prefix, not from a system-wide or older install.
  file(STRINGS "${build}/CMakeCache.txt" lora_dir_line REGEX "^lora_DIR:")
  string(REGEX REPLACE "^lora_DIR:[A-Z]+=" "" lora_dir "${lora_dir_line}")
  get_filename_component(real_prefix "${prefix}" REALPATH)
  get_filename_component(real_lora_dir "${lora_dir}" REALPATH)
  string(FIND "${real_lora_dir}/" "${real_prefix}/" at)
  if(NOT at EQUAL 0)
    message(FATAL_ERROR "[${CONSUMER}] lora was found in '${lora_dir}', not under the fresh prefix '${prefix}'")
  endif()
endif()

run_step("build" "${CMAKE_COMMAND}" --build "${build}" ${config_args})

if(NOT APPS)
  set(APPS app)
endif()
string(REPLACE "," ";" apps "${APPS}")
string(REPLACE "," ";" app_args "${APP_ARGS}")
foreach(name IN LISTS apps)
  # Single-config generators put executables in the build dir, multi-config ones in <build>/<config>.
  set(app "${build}/${name}")
  if(NOT EXISTS "${app}" AND CONFIG AND EXISTS "${build}/${CONFIG}/${name}")
    set(app "${build}/${CONFIG}/${name}")
  endif()
  run_step("run" "${app}" ${app_args})
endforeach()
