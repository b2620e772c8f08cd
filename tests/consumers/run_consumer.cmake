# Configures, builds and runs one consumer project against this build of lora.
#
#   cmake -DCONSUMER=find_package|add_subdirectory -DCONSUMER_SOURCE_DIR=<dir>
#         -DWORK_DIR=<scratch dir> -DLORA_SOURCE_DIR=<repo> -DLORA_BUILD_DIR=<build tree>
#         [-DCONFIG=<config>] [-DGENERATOR=<generator>] [-DCXX_COMPILER=<compiler>]
#         -P run_consumer.cmake
#
# find_package first installs LORA_BUILD_DIR into a fresh prefix under WORK_DIR
# and points the consumer at that prefix only. WORK_DIR is wiped on every run.
cmake_minimum_required(VERSION 3.16)

foreach(var IN ITEMS CONSUMER CONSUMER_SOURCE_DIR WORK_DIR LORA_SOURCE_DIR LORA_BUILD_DIR)
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

if(CONSUMER STREQUAL "find_package")
  run_step("install" "${CMAKE_COMMAND}" --install "${LORA_BUILD_DIR}" --prefix "${prefix}" ${config_args})
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}")
elseif(CONSUMER STREQUAL "add_subdirectory")
  list(APPEND configure_args "-DLORA_SOURCE_DIR=${LORA_SOURCE_DIR}")
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown CONSUMER '${CONSUMER}'")
endif()

run_step("configure" "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE_DIR}" -B "${build}" ${configure_args})

if(CONSUMER STREQUAL "find_package")
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

# Single-config generators put app in the build dir, multi-config ones in <build>/<config>.
set(app "${build}/app")
if(NOT EXISTS "${app}" AND CONFIG AND EXISTS "${build}/${CONFIG}/app")
  set(app "${build}/${CONFIG}/app")
endif()
run_step("run" "${app}")
